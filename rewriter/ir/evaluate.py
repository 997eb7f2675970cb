"""Evaluators for values that only look dynamic: shape chains over static dims, constant subgraphs.

Exporters compute scales and reshape targets at run time (`Shape → Gather → Cast → Sqrt → Div`),
and build masks from constants with ops numpy folding does not cover. `fold_shape_chains` evaluates
the former in numpy over the static part of shapes; `evaluate_constant` runs the latter in
onnxruntime. Both answer None rather than guess.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attnrewrite.ir.dtypes import numpy_dtype
from attnrewrite.ir.graph import MAX_FOLDED_ELEMENTS, const_array, static_dims


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
        to = numpy_dtype(_attr(node, "to"))
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


def evaluate_constant(value: ir.Value, max_elements: int = 1 << 24) -> np.ndarray | None:
    """Compute a constant-only value with onnxruntime (any op), or None if it cannot be run."""
    arr = const_array(value)
    if arr is not None:
        return arr
    from attnrewrite.ir.submodel import build_submodel

    try:
        proto, inputs = build_submodel(value.graph, [value])
        if inputs:
            return None
        from attnrewrite.runtime import cpu_session

        sess = cpu_session(proto.SerializeToString())
        (out,) = sess.run(None, {})
    except Exception:  # noqa: BLE001 - e.g. an op ORT lacks; the value stays symbolic
        return None
    return out if out.size <= max_elements else None
