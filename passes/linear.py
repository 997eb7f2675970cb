"""`linear` (lossy): kernelised attention, linear in the number of tokens.

    O_i = φ(q_i)ᵀ (Σ_j w_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j w_j φ(k_j) + ε)

computed right-to-left, so the cost is O(N·d²) instead of O(N²·d) (Katharopoulos et al. 2020 for
φ = elu+1; T2R for φ = relu). The softmax scale enters as φ(√s·q), φ(√s·k) so it is applied once.
A bias that depends only on the key (a padding mask, `[B, 1|h, 1, Nk]`) is honoured exactly the way
softmax honours it: key j is weighted by w_j = exp(b_j), which is 0 for masked keys. A bias that
varies per query (relative positions, window masks) cannot be expressed and the site is declined.
`prefix=exact` keeps the prefix queries (CLS, registers) on exact softmax attention: they pool the
whole image and are what a classifier head reads.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes.sdpa import const, reduce, softmax_attention
from attnrewrite.registry import Param, positive_float, register
from attnrewrite.site import AttentionSite


def feature_map(t: ir_tape.Tape, x: ir.Value, phi: str) -> ir.Value:
    """φ(x) ≥ 0 elementwise: elu(x)+1 or relu(x)."""
    if phi == "elu1":
        return t.op("Add", [t.op("Elu", [x], attributes={"alpha": 1.0}), const(t, 1.0, np.float32)])
    return t.op("Relu", [x])


def linear_attention(
    t: ir_tape.Tape, graph: ir.Graph, q: ir.Value, k: ir.Value, v: ir.Value, *, scale: float, phi: str,
    eps: float, key_weight: ir.Value | None = None,
) -> ir.Value:
    """φ(Q)·(φ(K)ᵀ·V) / (φ(Q)·Σ_j φ(K_j) + ε), all `[B, h, N, ·]`; `key_weight` is `[B|1, h|1, Nk, 1]`."""
    root = const(t, math.sqrt(scale), np.float32)
    fq = feature_map(t, t.op("Mul", [q, root]), phi)
    fk = feature_map(t, t.op("Mul", [k, root]), phi)
    if key_weight is not None:
        fk = t.op("Mul", [fk, key_weight])
    kv = t.op("MatMul", [t.op("Transpose", [fk], attributes={"perm": [0, 1, 3, 2]}), v])  # [B,h,m,dv]
    z = reduce(t, graph, "ReduceSum", fk, [2])  # [B,h,1,m]
    numerator = t.op("MatMul", [fq, kv])  # [B,h,Nq,dv]
    denominator = t.op("MatMul", [fq, t.op("Transpose", [z], attributes={"perm": [0, 1, 3, 2]})])  # [B,h,Nq,1]
    return t.op("Div", [numerator, t.op("Add", [denominator, const(t, eps, np.float32)])])




class LinearPass:
    name = "linear"
    exact = False
    description = "kernelised linear attention φ(Q)(φ(K)ᵀV) with φ = elu+1 or relu; cost linear in tokens"
    params = (
        Param("phi", str, "elu1", "feature map", choices=("elu1", "relu")),
        Param("eps", positive_float, 1e-6, "added to the normaliser"),
        Param("prefix", str, "linear", "exact: prefix tokens (CLS, registers) keep softmax attention",
              choices=("linear", "exact")),
    )

    def applies(self, site: AttentionSite, options: dict) -> str | None:
        if not site.bias_per_key:
            return f"{site.bias_kind} bias varies per query (e.g. relative positions or window masks); linear attention can only weight keys"
        if options["prefix"] == "exact" and site.prefix_tokens is None:
            return "prefix=exact needs known prefix tokens (no patch grid traced)"
        return None

    def rewrite(self, graph: ir.Graph, site: AttentionSite, options: dict) -> ir.Value:
        t = ir_tape.Tape(graph)
        weight = None
        if site.bias is not None:
            # softmax weights keys by exp(b_j); the max-shift keeps exp finite and cancels in the ratio
            b = site.bias
            rank = len(b.shape)
            if rank < 4:
                b = t.op("Unsqueeze", [b, const(t, list(range(4 - rank)))])
            if b.shape is None or b.shape[2] != 1:  # per-key bias materialised per query: take one row
                b = t.op("Slice", [b, const(t, [0]), const(t, [1]), const(t, [2])])
            shifted = t.op("Sub", [b, reduce(t, graph, "ReduceMax", b, [3])])
            weight = t.op("Transpose", [t.op("Exp", [shifted])], attributes={"perm": [0, 1, 3, 2]})
        prefix = site.prefix_tokens or 0
        if options["prefix"] != "exact" or prefix == 0:
            return linear_attention(
                t, graph, site.q, site.k, site.v, scale=site.scale, phi=options["phi"], eps=options["eps"], key_weight=weight
            )
        q_len = site.q_len if site.q_len is not None else np.iinfo(np.int64).max
        q_prefix = t.op("Slice", [site.q, const(t, [0]), const(t, [prefix]), const(t, [2])])
        q_grid = t.op("Slice", [site.q, const(t, [prefix]), const(t, [q_len]), const(t, [2])])
        exact = softmax_attention(t, q_prefix, site.k, site.v, site.scale, site.bias)
        lin = linear_attention(
            t, graph, q_grid, site.k, site.v, scale=site.scale, phi=options["phi"], eps=options["eps"], key_weight=weight
        )
        return t.op("Concat", [exact, lin], attributes={"axis": 2})


register(LinearPass())
