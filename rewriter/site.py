"""`AttentionSite`: the one semantic record every pass consumes.

A site means `O = softmax(scale · Q·Kᵀ + bias) · V` with Q/K/V viewed as `[B, heads, tokens, dim]`,
whatever the exporter wrote. The meaning is a plain frozen record, `SiteInfo`, that any front-end can
fill (ONNX detection today; a torch.fx front-end tomorrow). The ONNX front-end pairs it with value
handles: detection materialises the `[B, h, N, d]` view in the graph (a Transpose for Kᵀ written as
`k.permute(0,2,3,1)`, an Unsqueeze for `[B·h, N, d]` layouts, the logits chain replayed on zeros as
one additive bias), so a pass never has to know how the original was spelled. Values that a pass
does not use are removed by dead-code elimination afterwards.

Both records are built once, complete, and never mutated: what a later step learns (a bias that is
the same for every query on real inputs) makes a new record with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import onnx_ir as ir

BiasKind = Literal["none", "constant", "input"]
#: How the original output relates to the `[B, h, Nq, dv]` view: "bhnd" (the same), "squeeze1"
#: (`[B·h, N, d]`, heads folded into the batch), "folded_qk" (Q and K folded so, V and the output
#: `[B, h, N, d]`: the dynamo exporter's form of BLOOM's `bmm`s) or "merge_heads" (`[B, N, h·d]`, fused ops).
Layout = Literal["bhnd", "squeeze1", "folded_qk", "merge_heads", "units"]


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """What an attention call computes, with no reference to any graph."""

    op: str  # anchor: "Softmax", "Attention", "com.microsoft.MultiHeadAttention", ...
    num_heads: int | None
    head_dim: int | None
    q_len: int | None
    kv_len: int | None
    scale: float
    bias_kind: BiasKind
    #: the bias is the same for every query (a key padding mask), even if materialised per query
    bias_per_key: bool
    kind: Literal["self", "cross"]
    instances: int
    window: tuple[int, ...] | None
    grid: tuple[int, ...] | None
    prefix_tokens: int | None
    #: tokens after the grid tokens (YOLOS' detection tokens); `prefix_tokens` are the ones before it
    suffix_tokens: int
    rotary: bool
    output_layout: Layout
    notes: tuple[str, ...] = ()
    #: the tokens were made by a convolution (image, video, feature map): a site with no traced grid
    #: is still spatial, never a 1-D sequence unless the user says so
    vision: bool = False


_INFO_FIELDS = frozenset(f.name for f in dataclasses.fields(SiteInfo))


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionSite:
    """A `SiteInfo` plus the ONNX values that carry it; `site.grid` etc. read through to `info`."""

    id: str
    info: SiteInfo
    anchor: ir.Node
    q: ir.Value  # [B, h, Nq, d]
    k: ir.Value  # [B, h, Nk, d]  (not transposed)
    v: ir.Value  # [B, h, Nk, dv]
    output: ir.Value  # the original attention output, in the original layout
    bias: ir.Value | None  # additive, broadcastable to [B, h, Nq, Nk]
    nodes: tuple[ir.Node, ...]
    verified: bool = False

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: the semantic fields live on `info`
        if name in _INFO_FIELDS:
            return getattr(self.info, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def with_info(self, **changes) -> AttentionSite:
        """The same site with some semantic fields changed (a new record; this one stays as it is)."""
        return dataclasses.replace(self, info=dataclasses.replace(self.info, **changes))

    @property
    def layer(self) -> int:
        """Position of the site in execution order (sites are numbered 0..n-1)."""
        tail = self.id.rsplit("_", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    def to_json(self) -> dict:
        i = self.info
        return {
            "id": self.id,
            "op": i.op,
            "kind": i.kind,
            "num_heads": i.num_heads,
            "head_dim": i.head_dim,
            "q_len": i.q_len,
            "kv_len": i.kv_len,
            "instances": i.instances,
            "scale": float(i.scale),
            "bias": i.bias_kind,
            "window": list(i.window) if i.window else None,
            "grid": list(i.grid) if i.grid else None,
            "prefix_tokens": i.prefix_tokens,
            "suffix_tokens": i.suffix_tokens,
            "rotary": i.rotary,
            "vision": i.vision,
            "verified": self.verified,
            "nodes": [n.name or "" for n in self.nodes],
            "notes": list(i.notes),
        }


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A softmax (or fused op) that is not rewritable attention, and why; `node` names the culprit."""

    node: str
    reason: str

    def to_json(self) -> dict:
        return {"node": self.node, "reason": self.reason}
