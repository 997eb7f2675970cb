"""`sdpa` (exact): re-emit each site as one canonical minimal subgraph.

Exporters surround attention with noise (√scale on both Q and Kᵀ, shape chains, casts, 5-D views
for window masks). This pass writes `Softmax(scale·Q·Kᵀ + bias)·V` with the folded scale, or the
fused ONNX `Attention` op (`fuse=onnx`, opset ≥ 23) or ORT's `com.microsoft.MultiHeadAttention`
(`fuse=ort`), which onnxruntime runs as one kernel. Drift must stay at float rounding (≤ 1e-5).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.registry import Param, register
from attnrewrite.site import AttentionSite


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


class SdpaPass:
    name = "sdpa"
    exact = True
    description = "canonical Softmax(scale·QKᵀ+bias)·V; fuse=onnx|ort emits one fused attention op"
    params = (
        Param("fuse", str, "none", "none: plain ops; onnx: ONNX Attention (opset>=23); ort: com.microsoft.MultiHeadAttention",
              choices=("none", "onnx", "ort")),
    )

    def applies(self, site: AttentionSite, options: dict) -> str | None:
        fuse = options["fuse"]
        if fuse == "onnx" and site.anchor.graph is not None:
            opset = site.anchor.graph.opset_imports.get("", 0)
            if opset < 23:
                return f"fuse=onnx needs opset >= 23 (model has {opset})"
        if fuse == "ort":
            if site.num_heads is None or site.head_dim is None:
                return "fuse=ort needs static heads and head dim"
            if site.output_layout == "squeeze1" and site.instances is None:
                return "fuse=ort needs [B, h, N, d] layout"
        return None

    def rewrite(self, graph: ir.Graph, site: AttentionSite, options: dict) -> ir.Value:
        t = ir_tape.Tape(graph)
        fuse = options["fuse"]
        if fuse == "onnx":
            inputs = [site.q, site.k, site.v]
            if site.bias is not None:
                inputs.append(bias_as_4d(t, site.bias, site.q, site.k))
            return t.op("Attention", inputs, attributes={"scale": float(site.scale)})
        if fuse == "ort":
            return _ort_mha(t, site)
        return softmax_attention(t, site.q, site.k, site.v, site.scale, site.bias)


def _merge(t: ir_tape.Tape, x: ir.Value, width: int) -> ir.Value:
    """[B, h, N, d] → [B, N, h·d]."""
    return t.op("Reshape", [t.op("Transpose", [x], attributes={"perm": [0, 2, 1, 3]}), const(t, [0, 0, width])])


def _unfold_heads(t: ir_tape.Tape, x: ir.Value, heads: int) -> ir.Value:
    """[B·h, 1, N, d] (a 3-D layout viewed as 4-D) → [B, h, N, d]."""
    return t.op("Reshape", [x, const(t, [-1, heads, 0, 0])])


def _ort_mha(t: ir_tape.Tape, site: AttentionSite) -> ir.Value:
    h, d = site.num_heads, site.head_dim
    folded = site.output_layout == "squeeze1"
    q4, k4, v4 = site.q, site.k, site.v
    if folded:
        q4, k4, v4 = (_unfold_heads(t, x, h) for x in (q4, k4, v4))
    dv = site.v.shape[3] if site.v.shape is not None and isinstance(site.v.shape[3], int) else d
    inputs: list[ir.Value | None] = [_merge(t, q4, h * d), _merge(t, k4, h * d), _merge(t, v4, h * dv)]
    if site.bias is not None:
        bias = site.bias
        if folded and bias.shape is not None and len(bias.shape) == 4 and bias.shape[0] != 1:
            bias = _unfold_heads(t, bias, h)
        inputs += [None, None, bias_as_4d(t, bias, q4, k4)]
    out = t.op("MultiHeadAttention", inputs, attributes={"num_heads": h, "scale": float(site.scale)}, domain="com.microsoft")
    # back to [B, h, N, dv]; the model's own head merge follows and onnxruntime cancels the transposes
    bhnd = t.op("Transpose", [t.op("Reshape", [out, const(t, [0, 0, h, dv])])], attributes={"perm": [0, 2, 1, 3]})
    if folded:
        bhnd = t.op("Reshape", [bhnd, const(t, [-1, 1, 0, 0])])
    return bhnd


register(SdpaPass())
