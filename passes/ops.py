"""ONNX op builders shared by every pass: typed constants, Reduce* across opsets, plain softmax
attention, and the bias shapes fused ops want. Passes build their subgraphs from these so that
opset and dtype rules live in one place."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape


def const(t: ir_tape.Tape, array, dtype=np.int64) -> ir.Value:
    return t.op("Constant", [], attributes={"value": ir.tensor(np.asarray(array, dtype=dtype))})


def float_type(value: ir.Value):
    """The numpy float type a site computes in (constants must match it: ONNX does not promote)."""
    return value.dtype.numpy() if value.dtype is not None and value.dtype.is_floating_point() else np.float32


def key_row(t: ir_tape.Tape, bias: ir.Value) -> ir.Value:
    """The first query row of a bias known to be the same for every query (a padding mask that the
    exporter expanded to `[.., Nq, Nk]`): `[.., 1, Nk]`, which broadcasts back over the queries."""
    if bias.shape is None or len(bias.shape) < 2 or bias.shape[-2] == 1:
        return bias
    dims = list(bias.shape)
    row = t.op("Slice", [bias, const(t, [0]), const(t, [1]), const(t, [len(dims) - 2])])
    row.shape, row.type = ir.Shape([*dims[:-2], 1, dims[-1]]), bias.type
    return row


def reduce(t: ir_tape.Tape, graph: ir.Graph, op: str, x: ir.Value, axes: list[int], keepdims: int = 1) -> ir.Value:
    """Reduce* with axes as an input (opset ≥ 18; ReduceSum ≥ 13) or as an attribute (older)."""
    opset = graph.opset_imports.get("", 17)
    if opset >= 18 or (op == "ReduceSum" and opset >= 13):
        return t.op(op, [x, const(t, axes)], attributes={"keepdims": keepdims})
    return t.op(op, [x], attributes={"axes": axes, "keepdims": keepdims})


def softmax_attention(t: ir_tape.Tape, q: ir.Value, k: ir.Value, v: ir.Value, scale: float, bias: ir.Value | None,
                      dtype=None) -> ir.Value:
    """The plain-op form every lossless rewrite falls back to: Softmax(scale·Q·Kᵀ + bias)·V.

    `dtype` is the float type of Q (default: read from `q`, which a value built on the tape lacks)."""
    kt = t.op("Transpose", [k], attributes={"perm": [0, 1, 3, 2]})
    logits = t.op("MatMul", [t.op("Mul", [q, const(t, scale, dtype or float_type(q))]), kt])
    if bias is not None:
        logits = t.op("Add", [logits, bias])
    probs = t.op("Softmax", [logits], attributes={"axis": -1})
    return t.op("MatMul", [probs, v])


def bias_as_4d(t: ir_tape.Tape, bias: ir.Value, q: ir.Value, k: ir.Value) -> ir.Value:
    """Fused ops want a rank-4 bias `[B|1, h|1, Nq, Nk]` with full query and key axes.

    A padding mask `[B, 1, 1, Nk]` is expanded to the token counts of Q and K: constants when they
    are static, read from Q and K at run time when the sequence axis is dynamic."""
    rank = len(bias.shape) if bias.shape is not None else 4
    dims = [1] * (4 - rank) + (list(bias.shape) if bias.shape is not None else [None] * 4)
    if rank < 4:
        bias = t.op("Unsqueeze", [bias, const(t, list(range(4 - rank)))])
    if dims[2] == 1 or dims[3] == 1:
        q_len, kv_len = (x.shape[2] if x.shape is not None and len(x.shape) == 4 else None for x in (q, k))
        if isinstance(q_len, int) and isinstance(kv_len, int):
            target = const(t, [1, 1, q_len, kv_len])
        else:
            lengths = [t.op("Shape", [x], attributes={"start": 2, "end": 3}) for x in (q, k)]
            target = t.op("Concat", [const(t, [1, 1]), *lengths], attributes={"axis": 0})
        bias = t.op("Expand", [bias, target])
    return bias
