"""What an anchor reader hands to detection: the values and the semantics it could read locally.

Each anchor (a Softmax chain, ONNX `Attention`, a `com.microsoft` op) is read by its own module and
returns a `Reading`, or raises `Reject` with the reason and the culprit node. Geometry that needs the
rest of the graph (self/cross, token grid, windows) is added by `context.describe`, and the
`AttentionSite` is built once from both.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from attnrewrite.ir.graph import (
    add_constant,
    add_node,
    dims,
)


class Reject(Exception):
    """Raised inside candidate analysis; carries the reason and the culprit node."""

    def __init__(self, reason: str, node: ir.Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


@dataclasses.dataclass(frozen=True)
class Reading:
    """One anchor, read: Q/K/V as `[B, h, N, d]` views, the folded scale and the additive bias."""

    op: str
    anchor: ir.Node
    q: ir.Value
    k: ir.Value
    v: ir.Value
    output: ir.Value
    num_heads: int | None
    head_dim: int | None
    q_len: int | None
    kv_len: int | None
    scale: float
    bias: ir.Value | None
    bias_kind: str
    bias_per_key: bool
    nodes: tuple[ir.Node, ...]
    output_layout: str = "bhnd"
    notes: tuple[str, ...] = ()


def value_rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def axes_input(graph: ir.Graph, axes: list[int]) -> ir.Value:
    return add_constant(graph, np.array(axes, dtype=np.int64), "axes")


def split_heads(graph: ir.Graph, x: ir.Value, heads: int) -> ir.Value:
    d = dims(x)
    if d is None or d[2] is None:
        raise Reject("hidden size unknown; cannot split heads")
    shape = add_constant(graph, np.array([0, 0, heads, d[2] // heads], np.int64), "heads_shape")
    r = add_node(graph, "Reshape", [x, shape], name="split_heads")
    out = add_node(graph, "Transpose", [r], {"perm": [0, 2, 1, 3]}, name="split_heads")
    out.shape = ir.Shape([x.shape[0], heads, x.shape[1], d[2] // heads])
    out.type = x.type
    return out


def typed(value: ir.Value, dtype: ir.DataType, shape: list | None) -> ir.Value:
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(shape) if shape is not None else None
    return value


_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Not", "Equal", "Neg", "Less", "Greater",
                "LessOrEqual", "GreaterOrEqual", "And", "Or", "Identity", "Min", "Max"}


def query_invariant(value: ir.Value, depth: int = 0) -> bool:
    """Is the bias the same for every query row? True when every source has a query axis of 1.

    Exporters often Expand a `[B, 1, 1, Nk]` padding mask to `[B, 1, Nq, Nk]`; looking through
    Expand and elementwise ops recovers that it only ever depended on the key.
    """
    shape = value.shape
    if shape is not None and (len(shape) < 2 or shape[-2] == 1):
        return True
    node = value.producer()
    if node is None or depth > 24:
        return False
    if node.op_type == "Expand":
        return query_invariant(node.inputs[0], depth + 1)
    if node.op_type in _ELEMENTWISE:
        return all(i is None or query_invariant(i, depth + 1) for i in node.inputs)
    return False
