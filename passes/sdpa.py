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

from attnrewrite.errors import PostconditionError
from attnrewrite.layout import heads_folded
from attnrewrite.onnx.verify import tolerance_for
from attnrewrite.passes.ops import bias_as_4d, const, softmax_attention
from attnrewrite.registry import BasePass, Param, Plan, SiteDrift
from attnrewrite.site import AttentionSite


class SdpaPass(BasePass):
    name = "sdpa"
    exact = True
    description = "canonical Softmax(scale·QKᵀ+bias)·V; fuse=onnx|ort emits one fused attention op"
    params = (
        Param("fuse", str, "none", "none: plain ops; onnx: ONNX Attention (opset>=23); ort: com.microsoft.MultiHeadAttention",
              choices=("none", "onnx", "ort")),
    )

    def applies(self, site: AttentionSite, options: dict) -> str | Plan:
        fuse = options["fuse"]
        if fuse == "onnx" and site.anchor.graph is not None:
            opset = site.anchor.graph.opset_imports.get("", 0)
            if opset < 23:
                return f"fuse=onnx needs opset >= 23 (model has {opset})"
        if fuse == "ort":
            if site.num_heads is None or site.head_dim is None:
                return "fuse=ort needs static heads and head dim"
            if heads_folded(site.output_layout) and site.instances is None:
                return "fuse=ort needs [B, h, N, d] layout"
        return Plan(options)

    def rewrite(self, graph: ir.Graph, site: AttentionSite, plan: Plan) -> ir.Value:
        t = ir_tape.Tape(graph)
        fuse = plan.options["fuse"]
        if fuse == "onnx":
            inputs = [site.q, site.k, site.v]
            if site.bias is not None:
                inputs.append(bias_as_4d(t, site.bias, site.q, site.k))
            return t.op("Attention", inputs, attributes={"scale": float(site.scale)})
        if fuse == "ort":
            return _ort_mha(t, site)
        return softmax_attention(t, site.q, site.k, site.v, site.scale, site.bias)

    def ensures(self, drift: SiteDrift) -> None:
        """An exact rewrite may only move the site's output by float rounding (1e-5 relative in fp32)."""
        limit = max(EXACT_TOLERANCE, tolerance_for(_dtype(drift.site)) / 10)
        rel = drift.metrics.get("rel_l2", 0.0)
        if not rel <= limit:
            raise PostconditionError(
                f"sdpa promises an exact rewrite, but site {drift.site.id} moved by rel_l2 {rel:.2e} (limit {limit:g})")


#: What `sdpa` promises at a float32 site (float16/bfloat16 sites round every step more coarsely).
EXACT_TOLERANCE = 1e-5


def _dtype(site: AttentionSite):
    return site.q.dtype.numpy() if site.q.dtype is not None and site.q.dtype.is_floating_point() else np.float32


def _merge(t: ir_tape.Tape, x: ir.Value, width: int) -> ir.Value:
    """[B, h, N, d] → [B, N, h·d]."""
    return t.op("Reshape", [t.op("Transpose", [x], attributes={"perm": [0, 2, 1, 3]}), const(t, [0, 0, width])])


def _unfold_heads(t: ir_tape.Tape, x: ir.Value, heads: int) -> ir.Value:
    """[B·h, 1, N, d] (a 3-D layout viewed as 4-D) → [B, h, N, d]."""
    return t.op("Reshape", [x, const(t, [-1, heads, 0, 0])])


def _ort_mha(t: ir_tape.Tape, site: AttentionSite) -> ir.Value:
    h, d = site.num_heads, site.head_dim
    folded = heads_folded(site.output_layout)
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


SDPA = SdpaPass()
