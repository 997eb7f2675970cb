"""Spelled-out softmax, put back together so that detection has one anchor to look for.

Some exports write softmax as its formula: `e = Exp(x − ReduceMax(x))`, `e / ReduceSum(e)` over the
last axis. onnxruntime's transformer optimizer does this for half-precision models on CPU (it inlines
the Softmax function body with precision casts), and converters from other frameworks do it too.
Both forms (with or without the max shift, which softmax does not need mathematically) are replaced
by one `Softmax(x, axis=-1)`; the unused pieces go with dead-code elimination.
"""

from __future__ import annotations

import onnx_ir as ir


def fuse_spelled_out_softmax(graph: ir.Graph) -> int:
    """Replace every `Exp(x [− max x]) / Σ Exp(…)` over the last axis with `Softmax(x)`; returns the count."""
    fused = 0
    for div in list(graph):
        if div.op_type != "Div" or div.domain not in ("", "ai.onnx") or len(div.inputs) != 2:
            continue
        logits = _softmax_input(div)
        if logits is None:
            continue
        softmax = ir.node("Softmax", [logits], attributes={"axis": -1}, name=f"{div.name or 'div'}/softmax")
        out = softmax.outputs[0]
        out.name = f"{div.outputs[0].name}/softmax"
        out.type, out.shape = div.outputs[0].type, div.outputs[0].shape
        graph.insert_after(div, softmax)
        old = div.outputs[0]
        was_output, name = old.is_graph_output(), old.name
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        if was_output:  # the model's output keeps its name
            old.name, out.name = f"{name}/spelled_out", name
        fused += 1
    return fused


def _softmax_input(div: ir.Node) -> ir.Value | None:
    """x when `div` is Exp(x − ReduceMax(x)) / ReduceSum(that Exp), both over the last axis; else None."""
    exp_out, total = div.inputs
    exp = exp_out.producer() if exp_out is not None else None
    reduce_sum = total.producer() if total is not None else None
    if exp is None or exp.op_type != "Exp" or reduce_sum is None or reduce_sum.op_type != "ReduceSum":
        return None
    if reduce_sum.inputs[0] is not exp_out or not _over_last_axis(reduce_sum):
        return None
    shifted = exp.inputs[0]
    sub = shifted.producer()
    if sub is not None and sub.op_type == "Sub":
        x, peak = sub.inputs
        reduce_max = peak.producer() if peak is not None else None
        if reduce_max is not None and reduce_max.op_type == "ReduceMax" and reduce_max.inputs[0] is x \
                and _over_last_axis(reduce_max):
            return x
    return shifted


def _over_last_axis(node: ir.Node) -> bool:
    """Reduces exactly the last axis and keeps it (keepdims=1), as softmax's normaliser does."""
    keepdims = node.attributes["keepdims"].value if "keepdims" in node.attributes else 1
    axes = reduced_axes(node)
    if not keepdims or axes is None:
        return False
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    return len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def reduced_axes(node: ir.Node) -> list[int] | None:
    """The axes a Reduce* node reduces, from its `axes` attribute (before opset 18) or constant `axes`
    input (opset 18+); None when it reduces all axes or they are not constant."""
    if "axes" in node.attributes:
        return list(node.attributes["axes"].value)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = ir.convenience.get_const_tensor(node.inputs[1])
        return None if tensor is None else [int(a) for a in tensor.numpy().reshape(-1)]
    return None

