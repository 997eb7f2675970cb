"""Undo the onnxruntime fusions that hide attention in models saved after ORT's graph optimiser.

Deployment pipelines often ship the model ORT wrote with `optimized_model_filepath` (or the
transformers optimiser's output). There, `q @ kᵀ * scale` is one `com.microsoft.FusedMatMul` with
`alpha = scale` and the transpose folded in (`MatMulScaleFusion`), which no detector rule reads. Such
a node that feeds a Softmax is expanded back into Transpose → MatMul → Mul: the same numbers, in
standard ops; onnxruntime fuses them again when it loads the rewritten model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

#: ops between the logits product and the Softmax that a logits chain may contain
_LOGITS_CHAIN = {"Add", "Mul", "Div", "Where", "Sub", "Cast"}


def expand_fused_matmuls(graph: ir.Graph) -> int:
    """Expand `FusedMatMul` nodes whose output reaches a Softmax through a logits chain; returns the count."""
    count = 0
    for node in list(graph):
        if node.op_type == "FusedMatMul" and node.domain == "com.microsoft" and _feeds_softmax(node.outputs[0]):
            count += _expand(graph, node)
    return count


def _feeds_softmax(value: ir.Value, depth: int = 4) -> bool:
    for user, _ in value.uses():
        if user.op_type == "Softmax":
            return True
        if depth and user.op_type in _LOGITS_CHAIN and _feeds_softmax(user.outputs[0], depth - 1):
            return True
    return False


def _expand(graph: ir.Graph, node: ir.Node) -> int:
    """Replace one FusedMatMul by [Transpose] → MatMul → [Mul alpha]; 1 if done, 0 if left as it is."""
    attrs = node.attributes
    trans = [bool(attrs.get_int("transA", 0)), bool(attrs.get_int("transB", 0))]
    if attrs.get_int("transBatchA", 0) or attrs.get_int("transBatchB", 0) or node.outputs[0].is_graph_output():
        return 0  # batch-axis transposes are rare: left for the detector to reject with its reason
    if any(t and x.shape is None for t, x in zip(trans, node.inputs[:2])):
        return 0  # a transpose of unknown rank cannot be written
    new_nodes: list[ir.Node] = []
    operands = []
    for transposed, x in zip(trans, node.inputs[:2]):
        if transposed:
            rank = len(x.shape)
            new_nodes.append(ir.node("Transpose", [x], attributes={"perm": [*range(rank - 2), rank - 1, rank - 2]}))
            x = new_nodes[-1].outputs[0]
        operands.append(x)
    new_nodes.append(ir.node("MatMul", operands))
    alpha = attrs.get_float("alpha", 1.0)
    if alpha != 1.0:
        dtype = node.outputs[0].dtype.numpy() if node.outputs[0].dtype is not None else np.float32
        scale = ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray(alpha, dtype=dtype))})
        new_nodes += [scale, ir.node("Mul", [new_nodes[-1].outputs[0], scale.outputs[0]])]
    for i, new in enumerate(new_nodes):
        new.name = f"{node.name or 'FusedMatMul'}/expanded_{i}"
    graph.insert_before(node, new_nodes)
    out = new_nodes[-1].outputs[0]
    out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
    node.outputs[0].replace_all_uses_with(out)
    graph.remove(node, safe=True)
    return 1
