"""Canonicalisation: make exporter noise constant before anyone looks for attention.

Exporters compute the softmax scale and reshape targets at run time from `Shape` chains
(`Shape → Gather → Cast → Sqrt → Div`), because the traced code said `q.shape[-1] ** -0.5`.
onnxscript's constant folder handles fully static graphs; a dynamic batch dimension makes it give up
on the whole chain even though the head dimension it needs is static. `fold_shape_chains` evaluates
those chains over the static part of shapes and turns them into constants, so the detector sees a
plain `Mul(x, 0.125)` whatever the exporter wrote.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import _constant_folding

from attnrewrite.patterns import fuse_spelled_out_softmax

logger = logging.getLogger(__name__)

#: Results of at most this many elements become constants (shape vectors, scales, small masks).
MAX_FOLDED_ELEMENTS = 4096


def canonicalize(model: ir.Model) -> ir.Model:
    """Fold constants and shape chains, remove dead code and infer shapes, in place; returns `model`."""
    with _quiet_folder():
        return _canonicalize(model)


@contextlib.contextmanager
def _quiet_folder():
    """onnxscript's folder logs a warning for every node it declines ("Skipping constant folding for
    op Split…", failed evaluations on concrete-size copies); without a logging setup Python prints
    them on stderr, which users read as errors. Declining is expected here: silence the warnings."""
    folder_logger = logging.getLogger(_constant_folding.__name__)
    level = folder_logger.level
    folder_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        folder_logger.setLevel(level)


def _canonicalize(model: ir.Model) -> ir.Model:
    # Shapes first (whole-graph ONNX inference is cheaper than onnxscript's per-node inference), so
    # that one constant-folding pass sees the shape chains already replaced by constants.
    common_passes.InlinePass()(model)
    infer_static_dims(model)
    fold_shape_chains(model.graph)
    _constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=1 << 16, output_size_limit=1 << 20,
                                        should_fold=reproducible_fold)(model)
    fuse_spelled_out_softmax(model.graph)  # after folding: its axes inputs are constants by now
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
    return model


#: Float ops whose every element is one correctly rounded IEEE operation (or an exact copy), so a
#: folded result is bit-identical to what onnxruntime computes at run time.
_EXACT_FLOAT_OPS = {
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Max", "Min", "Clip", "Relu", "Floor", "Ceil",
    "Round", "Sign", "Cast", "CastLike", "Where", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
    "Flatten", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "Expand", "Tile", "Pad",
    "ConstantOfShape", "Constant", "Range", "Trilu", "ScatterND", "ScatterElements", "Shape", "Size",
}
#: Float results up to this many elements fold whatever the op (scales computed with Pow, say): an
#: ulp of difference in a scalar is far below any tolerance, and detection needs scales as numbers.
_ALWAYS_FOLD_ELEMENTS = 16


def reproducible_fold(node: ir.Node) -> bool | None:
    """`should_fold` for onnxscript's folder: leave sums, products of matrices and transcendentals to
    onnxruntime.

    numpy and onnxruntime round MatMul, reductions and exp/sigmoid differently; folding Swin V2's
    position-bias MLP in numpy moved its outputs by 1e-5. Kept in the graph, such constant subgraphs
    are still constants for detection (evaluated with onnxruntime) and for ORT's own folding.
    """
    if node.domain not in ("", "ai.onnx") or node.op_type in _EXACT_FLOAT_OPS:
        return None
    for out in node.outputs:
        if out.dtype is not None and out.dtype.is_floating_point():
            shape = out.shape
            if shape is None or not shape.is_static() or int(np.prod(list(shape))) > _ALWAYS_FOLD_ELEMENTS:
                return False
    return None


def infer_static_dims(model: ir.Model) -> int:
    """Find which dims are static although inputs are dynamic; returns how many shapes improved.

    ONNX shape inference gives up on `Reshape(x, Concat(Shape(x)[0], 17, 4, 8))` when the batch is
    symbolic. Running it (with data propagation) twice with two different concrete sizes for every
    dynamic input dim shows which dims follow the inputs (they differ) and which are static (they
    agree), so `[batch, 4, 17, 8]` is known even for a dynamic-batch export. Data propagation stops
    at ops such as `Where`/`Equal` (TorchScript's `expand(x.shape[0], -1, -1)`); when that leaves a
    softmax's logits unresolved, the concrete copies are constant-folded instead, which evaluates
    every shape chain but costs a pass over the graph.
    """
    proto = ir.serde.serialize_model(model)
    # contrib ops' outputs have no element type either; the first run's inference supplies it
    untyped = model if any(node.domain == "com.microsoft" for node in proto.graph.node) else None
    dynamic = [
        (inp, i) for inp in proto.graph.input for i, d in enumerate(inp.type.tensor_type.shape.dim)
        if not d.HasField("dim_value")
    ]
    if not dynamic:  # one run gives the static shapes
        run = _propagated_shapes(proto, dynamic, 0, untyped)
        return _merge_runs(model, [run, run])
    runs = [_propagated_shapes(proto, dynamic, 2, untyped), _propagated_shapes(proto, dynamic, 3)]
    improved = _merge_runs(model, runs)
    if _softmax_logits_unresolved(model):
        improved += _merge_runs(model, [_folded_shapes(proto, dynamic, size) for size in (2, 3)])
    return improved


def _with_sizes(proto: onnx.ModelProto, dynamic: list, size: int) -> onnx.ModelProto:
    for inp, i in dynamic:
        inp.type.tensor_type.shape.dim[i].dim_value = size
    return proto


def _propagated_shapes(proto: onnx.ModelProto, dynamic: list, size: int,
                       fill_types: ir.Model | None = None) -> dict[str, list] | None:
    """Dims inferred with every dynamic input dim set to `size`; also types the untyped values of
    `fill_types` from the same inference (element types do not depend on the sizes)."""
    try:
        inferred = _infer_shapes(_with_sizes(proto, dynamic, size))
    except Exception:  # noqa: BLE001 - inference is best effort
        return None
    if fill_types is not None:
        _fill_missing_types(fill_types, inferred)
    return {
        vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        for vi in inferred.graph.value_info if vi.type.tensor_type.HasField("shape")
    }


def _infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, or onnxruntime's symbolic inference for graphs with com.microsoft ops.

    ONNX inference knows no contrib op, so after ORT's transformer optimizer (SkipLayerNormalization,
    FastGelu, BiasGelu…) every value downstream of the first fused op would lose its shape, and with
    it the heads and token counts of every later attention site. ORT's own inference knows them.
    """
    if any(node.domain == "com.microsoft" for node in proto.graph.node):
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        try:
            return SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=True)
        except Exception:  # noqa: BLE001 - fall back to ONNX inference, which covers the standard ops
            pass
    return onnx.shape_inference.infer_shapes(proto, data_prop=True)


def _fill_missing_types(model: ir.Model, inferred: onnx.ModelProto) -> None:
    """Element types for values ONNX inference could not type (outputs of contrib ops)."""
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    for node in model.graph:
        for value in node.outputs:
            elem = types.get(value.name)
            if value.type is None and elem:
                value.type = ir.TensorType(ir.DataType(elem))


def _folded_shapes(proto: onnx.ModelProto, dynamic: list, size: int) -> dict[str, list] | None:
    """Shapes of a copy with concrete input sizes after constant folding (weights are never loaded)."""
    fold = _constant_folding.FoldConstantsPass(
        shape_inference=True, input_size_limit=MAX_FOLDED_ELEMENTS, output_size_limit=MAX_FOLDED_ELEMENTS
    )
    try:
        copy = ir.serde.deserialize_model(_with_sizes(proto, dynamic, size))
        for _ in range(4):  # onnxscript leaves ConstantOfShape unfolded; our evaluator takes it from there
            fold(copy)
            if not fold_shape_chains(copy.graph):
                break
    except Exception:  # noqa: BLE001 - inference is best effort
        return None
    return {
        v.name: [d if isinstance(d, int) else None for d in v.shape]
        for node in copy.graph for v in node.outputs if v.name and v.shape is not None
    }


def _softmax_logits_unresolved(model: ir.Model) -> bool:
    for node in model.graph:
        if node.op_type == "Softmax" and node.domain == "":
            dims = static_dims(node.inputs[0])
            if dims is None or len(dims) < 2 or None in dims[-2:]:
                return True
    return False


def _merge_runs(model: ir.Model, runs: list[dict[str, list] | None]) -> int:
    """Set every dim that both concrete runs agree on; dims that follow the inputs stay symbolic."""
    if any(r is None for r in runs):
        return 0
    improved = 0
    for node in model.graph:
        for value in node.outputs:
            a, b = runs[0].get(value.name), runs[1].get(value.name)
            if a is None or b is None or len(a) != len(b):
                continue
            old = list(value.shape) if value.shape is not None else [None] * len(a)
            if len(old) != len(a):
                continue
            new = [x if (x is not None and x == y) else o for x, y, o in zip(a, b, old)]
            if value.shape is None or any(isinstance(n, int) and not isinstance(o, int) for n, o in zip(new, old)):
                value.shape = ir.Shape(new)
                improved += 1
    return improved


# ---------------------------------------------------------------------------------------------
# A small evaluator over constants and the static part of shapes.


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content if it has one (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = value.producer()
        if node is not None and node.op_type == "Constant" and node.domain == "":
            attr = node.attributes.get("value")
            if attr is not None:
                tensor = attr.as_tensor()
            else:
                for key, kind in (("value_float", np.float32), ("value_int", np.int64)):
                    if key in node.attributes:
                        return np.array(node.attributes[key].value, dtype=kind)
                for key, kind in (("value_floats", np.float32), ("value_ints", np.int64)):
                    if key in node.attributes:
                        return np.array(node.attributes[key].value, dtype=kind)
    if tensor is None:
        return None
    if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes > MAX_FOLDED_ELEMENTS * 8:
        return None  # never pull big weights into memory just to look at them
    try:
        return tensor.numpy()
    except Exception:  # noqa: BLE001 - unreadable tensors are simply "not constant"
        return None


def static_dims(value: ir.Value) -> list[int | None] | None:
    """Shape as a list with None for symbolic dims; None when even the rank is unknown."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _shape_of(node: ir.Node) -> np.ndarray | None:
    dims = static_dims(node.inputs[0])
    if dims is None:
        return None
    rank = len(dims)
    start = node.attributes["start"].value if "start" in node.attributes else 0
    end = node.attributes["end"].value if "end" in node.attributes else rank
    start = max(0, min(rank, start + rank if start < 0 else start))
    end = max(0, min(rank, end + rank if end < 0 else end))
    part = dims[start:end]
    if any(d is None for d in part):
        return None
    return np.array(part, dtype=np.int64)


def _index_shape(node: ir.Node, args: list[np.ndarray | None]) -> np.ndarray | None:
    """Gather/Slice of `Shape(x)` when only the selected dims are static (dynamic batch, static rest)."""
    shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if shape_node is None or shape_node.op_type != "Shape":
        return None
    dims = static_dims(shape_node.inputs[0])
    if dims is None:
        return None
    rank = len(dims)
    start = _attr(shape_node, "start", 0)
    end = _attr(shape_node, "end", rank)
    dims = dims[slice(start, end)]
    positions = np.arange(len(dims))
    if node.op_type == "Gather":
        if args[1] is None:
            return None
        picked_pos = np.take(positions, args[1].astype(np.int64))
    else:
        if args[1] is None or args[2] is None:
            return None
        steps = args[4] if len(args) > 4 and args[4] is not None else [1]
        if len(args[1]) != 1:
            return None
        picked_pos = positions[int(args[1][0]):int(args[2][0]):int(steps[0])]
    picked = [dims[int(i)] for i in np.ravel(picked_pos)]
    if any(d is None for d in picked):
        return None
    return np.array(picked, dtype=np.int64).reshape(np.shape(picked_pos))


def _attr(node: ir.Node, name: str, default=None):
    return node.attributes[name].value if name in node.attributes else default


def _axes(node: ir.Node, position: int) -> list[int] | None:
    if len(node.inputs) > position and node.inputs[position] is not None:
        arr = const_array(node.inputs[position])
        return None if arr is None else [int(a) for a in np.ravel(arr)]
    value = _attr(node, "axes")
    return None if value is None else list(value)


_ONNX_TO_NUMPY = {
    1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
    9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
}


def _evaluate(node: ir.Node, args: list[np.ndarray | None]) -> np.ndarray | None:
    """Numpy semantics of the ops that appear in exporters' shape and scale chains."""
    op = node.op_type
    if op == "Shape":
        return _shape_of(node)
    if op in ("Gather", "Slice") and args[0] is None:
        return _index_shape(node, args)
    if any(a is None for a in args[:1]):
        return None
    a = args[0]
    if op == "Identity":
        return a
    if op == "Cast":
        to = _ONNX_TO_NUMPY.get(_attr(node, "to"))
        return None if to is None else a.astype(to)
    if op in ("Sqrt", "Reciprocal", "Neg", "Floor", "Ceil", "Abs"):
        fn = {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative,
              "Floor": np.floor, "Ceil": np.ceil, "Abs": np.abs}[op]
        return fn(a).astype(a.dtype)
    if op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"):
        b = args[1]
        if b is None:
            return None
        if op == "Div" and np.issubdtype(a.dtype, np.integer):
            return (a // b).astype(a.dtype)
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
              "Pow": np.power, "Max": np.maximum, "Min": np.minimum}[op]
        return fn(a, b).astype(a.dtype)
    if op == "Gather":
        idx = args[1]
        return None if idx is None else np.take(a, idx.astype(np.int64), axis=_attr(node, "axis", 0))
    if op == "Slice":
        starts, ends = args[1], args[2]
        if starts is None or ends is None:
            return None
        axes = args[3] if len(args) > 3 and args[3] is not None else np.arange(len(starts))
        steps = args[4] if len(args) > 4 and args[4] is not None else np.ones(len(starts), np.int64)
        index = [slice(None)] * a.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            index[int(ax)] = slice(int(s), int(e), int(st))
        return a[tuple(index)]
    if op == "Unsqueeze":
        axes = _axes(node, 1)
        if axes is None:
            return None
        out = a
        for ax in sorted(x % (a.ndim + len(axes)) for x in axes):
            out = np.expand_dims(out, ax)
        return out
    if op == "Squeeze":
        axes = _axes(node, 1)
        return np.squeeze(a) if axes is None else np.squeeze(a, axis=tuple(axes))
    if op == "Concat":
        if any(x is None for x in args):
            return None
        return np.concatenate(args, axis=_attr(node, "axis", 0))
    if op == "Reshape":
        shape = args[1]
        if shape is None:
            return None
        target = [a.shape[i] if d == 0 else int(d) for i, d in enumerate(shape)]
        return a.reshape(target)
    if op in ("Equal", "Less", "Greater", "And", "Or"):
        b = args[1]
        if b is None:
            return None
        fn = {"Equal": np.equal, "Less": np.less, "Greater": np.greater,
              "And": np.logical_and, "Or": np.logical_or}[op]
        return np.asarray(fn(a, b))
    if op == "Not":
        return np.logical_not(a)
    if op == "Where":
        if args[1] is None or args[2] is None:
            return None
        return np.where(a, args[1], args[2])
    if op == "Expand":
        if args[1] is None:
            return None
        shape = np.broadcast_shapes(a.shape, tuple(int(d) for d in args[1]))
        return np.broadcast_to(a, shape).copy() if np.prod(shape) <= MAX_FOLDED_ELEMENTS else None
    if op == "ConstantOfShape":
        if np.prod(a.astype(np.int64)) > MAX_FOLDED_ELEMENTS:  # e.g. an [N, N] mask: never allocate it here
            return None
        fill = _attr(node, "value")
        fill_arr = fill.numpy() if fill is not None else np.zeros(1, np.float32)
        return np.full(a.astype(np.int64), fill_arr.reshape(-1)[0], dtype=fill_arr.dtype)
    return None


_FOLDABLE = {
    "Shape", "Gather", "Identity", "Cast", "Sqrt", "Reciprocal", "Neg", "Floor", "Ceil", "Abs",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Slice", "Unsqueeze", "Squeeze", "Concat",
    "Reshape", "ConstantOfShape", "Equal", "Less", "Greater", "And", "Or", "Not", "Where", "Expand",
}


def fold_shape_chains(graph: ir.Graph) -> int:
    """Replace small values computable from constants and static dims with initializers; returns count."""
    known: dict[ir.Value, np.ndarray] = {}
    folded = 0
    for node in list(graph):
        if node.domain != "" or node.op_type not in _FOLDABLE or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if out.is_graph_output() or const_array(out) is not None:
            continue
        args = [None if v is None else known.get(v, const_array(v)) for v in node.inputs]
        if node.op_type not in ("Shape", "Gather", "Slice") and any(
            a is None for v, a in zip(node.inputs, args) if v is not None
        ):
            continue
        try:
            result = _evaluate(node, args)
        except Exception:  # noqa: BLE001 - an op we mis-evaluate is simply left alone
            result = None
        if result is None or result.size > MAX_FOLDED_ELEMENTS:
            continue
        known[out] = result
        _replace_with_constant(graph, node, out, result)
        folded += 1
    return folded


def _replace_with_constant(graph: ir.Graph, node: ir.Node, out: ir.Value, array: np.ndarray) -> None:
    name = graph.meta.setdefault("attnrewrite_folded", 0)
    graph.meta["attnrewrite_folded"] = name + 1
    const = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=f"folded_{name}")})
    const.outputs[0].name = f"attnrewrite_folded_{name}"
    const.outputs[0].shape = ir.Shape(array.shape)
    const.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    const.outputs[0].const_value = ir.tensor(array)
    graph.insert_before(node, const)
    out.replace_all_uses_with(const.outputs[0])
