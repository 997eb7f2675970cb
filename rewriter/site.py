"""`AttentionSite`: the one semantic record every pass consumes.

A site means `O = softmax(scale · Q·Kᵀ + bias) · V` with Q/K/V viewed as `[B, heads, tokens, dim]`,
whatever the exporter wrote. Detection materialises that view in the graph (a Transpose for Kᵀ
written as `k.permute(0,2,3,1)`, an Unsqueeze for `[B·h, N, d]` layouts, the logits chain replayed on
zeros as one additive bias), so a pass never has to know how the original was spelled. Values that a
pass does not use are removed by dead-code elimination afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import onnx_ir as ir

BiasKind = Literal["none", "constant", "input"]


@dataclasses.dataclass
class AttentionSite:
    id: str
    op: str  # anchor: "Softmax", "Attention", "com.microsoft.MultiHeadAttention", ...
    anchor: ir.Node
    q: ir.Value  # [B, h, Nq, d]
    k: ir.Value  # [B, h, Nk, d]  (not transposed)
    v: ir.Value  # [B, h, Nk, dv]
    output: ir.Value  # the original attention output, in the original layout
    num_heads: int | None
    head_dim: int | None
    q_len: int | None
    kv_len: int | None
    scale: float
    bias: ir.Value | None  # additive, broadcastable to [B, h, Nq, Nk]
    bias_kind: BiasKind
    kind: Literal["self", "cross"]
    instances: int
    window: tuple[int, int] | None
    grid: tuple[int, int] | None
    prefix_tokens: int | None
    rotary: bool
    nodes: list[ir.Node]
    #: how the original output relates to the `[B, h, Nq, dv]` view: "bhnd", "squeeze1" ([B·h, N, d]),
    #: or "merge_heads" ([B, N, h·d], fused ops)
    output_layout: str = "bhnd"
    #: the bias is the same for every query (a key padding mask), even if materialised per query
    bias_per_key: bool = False
    verified: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)
    #: tokens after the grid tokens (YOLOS' detection tokens); `prefix_tokens` are the ones before it
    suffix_tokens: int = 0

    @property
    def layer(self) -> int:
        """Position of the site in execution order (sites are numbered 0..n-1)."""
        return int(self.id.rsplit("_", 1)[-1]) if self.id.rsplit("_", 1)[-1].isdigit() else 0

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "op": self.op,
            "kind": self.kind,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "instances": self.instances,
            "scale": float(self.scale),
            "bias": self.bias_kind,
            "window": list(self.window) if self.window else None,
            "grid": list(self.grid) if self.grid else None,
            "prefix_tokens": self.prefix_tokens,
            "suffix_tokens": self.suffix_tokens,
            "rotary": self.rotary,
            "verified": self.verified,
            "nodes": [n.name or "" for n in self.nodes],
            "notes": list(self.notes),
        }


@dataclasses.dataclass
class Rejection:
    """A softmax (or fused op) that is not rewritable attention, and why; `node` names the culprit."""

    node: str
    reason: str

    def to_json(self) -> dict:
        return {"node": self.node, "reason": self.reason}
