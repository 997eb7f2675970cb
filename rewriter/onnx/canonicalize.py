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

from attnrewrite.ir.evaluate import fold_shape_chains
from attnrewrite.ir.graph import MAX_FOLDED_ELEMENTS, static_dims
from attnrewrite.onnx.ort_fusions import expand_fused_matmuls
from attnrewrite.onnx.softmax_fusion import fuse_spelled_out_softmax

logger = logging.getLogger(__name__)



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
    expand_fused_matmuls(model.graph)  # before shape inference: ONNX cannot infer through contrib ops
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
    runs = [_propagated_shapes(proto, dynamic, 2, untyped), _propagated_shapes(proto, dynamic, 3),
            _propagated_shapes(proto, dynamic, LARGE_SIZE)]
    improved = _merge_runs(model, runs)
    if _softmax_logits_unresolved(model):
        improved += _merge_runs(model, [_folded_shapes(proto, dynamic, size) for size in (2, 3, LARGE_SIZE)])
    return improved


#: The third concrete size for every dynamic input dim. 2 and 3 alone agree wherever a stride or
#: patch divides them away (a dynamic-resolution DINOv2 gave a 1×1 "static" patch grid at both, and
#: the rewritten graph broke); any stride up to 1344 separates 1344 from 2 and 3.
LARGE_SIZE = 1344


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
    """Set every dim that the first two concrete runs agree on and no later run contradicts; dims that
    follow the inputs stay symbolic. A later run only vetoes with a concrete, different number: at
    a large size inference can fail or lose dims (a sequence beyond the position table), which says
    nothing about them."""
    if len(runs) < 2 or runs[0] is None or runs[1] is None:
        return 0
    improved = 0
    for node in model.graph:
        for value in node.outputs:
            a, b = runs[0].get(value.name), runs[1].get(value.name)
            if a is None or b is None or len(a) != len(b):
                continue
            vetoes = [r.get(value.name) for r in runs[2:] if r is not None]
            vetoes = [v for v in vetoes if v is not None and len(v) == len(a)]
            old = list(value.shape) if value.shape is not None else [None] * len(a)
            if len(old) != len(a):
                continue
            new = [x if (x is not None and x == y and all(v[i] in (None, x) for v in vetoes)) else o
                   for i, (x, y, o) in enumerate(zip(a, b, old))]
            if value.shape is None or any(isinstance(n, int) and not isinstance(o, int) for n, o in zip(new, old)):
                value.shape = ir.Shape(new)
                improved += 1
    return improved
