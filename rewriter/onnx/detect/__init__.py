"""Find softmax attention by meaning and describe each call as an `AttentionSite`.

Anchors are Softmax nodes and fused attention ops; each has its own reader (`softmax.py`,
`onnx_attention.py`, `contrib.py`) that returns a `Reading` or rejects the node with the reason and
the culprit. `context.describe` adds what needs the rest of the graph (self/cross, token grid,
windows, prefix tokens), every candidate is checked numerically (`verify.py`), and each site that
passes is built once, complete.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from attnrewrite.onnx import context, verify
from attnrewrite.onnx.detect.contrib import read_contrib
from attnrewrite.onnx.detect.onnx_attention import read_onnx_attention
from attnrewrite.onnx.detect.reading import Reading, Reject
from attnrewrite.onnx.detect.softmax import read_softmax
from attnrewrite.site import AttentionSite, Rejection, SiteInfo


@dataclasses.dataclass
class Detection:
    model: ir.Model
    sites: list[AttentionSite]
    rejected: list[Rejection]


def detect(model: ir.Model, *, verify_sites: bool = True) -> Detection:
    """Find every attention site in a canonicalised model (adds helper nodes; run DCE before saving)."""
    graph = model.graph
    candidates: list[AttentionSite] = []
    rejected: list[Rejection] = []
    const_memo: dict = {}
    token_memo: dict = {}
    for node in list(graph):
        try:
            reading = _read(graph, node, const_memo)
        except Reject as rej:
            rejected.append(Rejection(node=_where(node, rej.node), reason=rej.reason))
            continue
        if reading is None:
            continue
        geometry = context.describe(reading, model, const_memo, token_memo)
        candidates.append(_site(f"attn_{len(candidates)}", reading, geometry))
    ir.passes.common.TopologicalSortPass()(model)
    if not verify_sites or not candidates:
        return Detection(model=model, sites=candidates, rejected=rejected)
    failures = verify.verify_sites(model, candidates)
    sites = []
    for site in candidates:
        if site.id in failures:
            rejected.append(Rejection(node=site.anchor.name or site.op, reason=failures[site.id]))
        else:
            sites.append(dataclasses.replace(site, id=f"attn_{len(sites)}", verified=True))
    return Detection(model=model, sites=sites, rejected=rejected)


def _read(graph: ir.Graph, node: ir.Node, const_memo: dict) -> Reading | None:
    """The reader for this node's anchor kind, or None when the node anchors no attention."""
    if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
        return read_softmax(graph, node, const_memo)
    if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
        return read_onnx_attention(graph, node)
    if node.domain == "com.microsoft" and node.op_type in ("MultiHeadAttention", "Attention"):
        return read_contrib(graph, node)
    return None


def _where(anchor: ir.Node, culprit: ir.Node | None) -> str:
    where = anchor.name or anchor.op_type
    if culprit is not None and culprit is not anchor:
        where = f"{where} (at {culprit.name or culprit.op_type})"
    return where


def _site(site_id: str, reading: Reading, geometry: context.Geometry) -> AttentionSite:
    info = SiteInfo(
        op=reading.op, num_heads=reading.num_heads, head_dim=reading.head_dim, q_len=reading.q_len,
        kv_len=reading.kv_len, scale=reading.scale, bias_kind=reading.bias_kind, bias_per_key=reading.bias_per_key,
        kind=geometry.kind, instances=geometry.instances, window=geometry.window, grid=geometry.grid,
        prefix_tokens=geometry.prefix_tokens, suffix_tokens=geometry.suffix_tokens, rotary=geometry.rotary,
        output_layout=reading.output_layout, notes=reading.notes + geometry.notes, vision=geometry.vision,
    )
    return AttentionSite(id=site_id, info=info, anchor=reading.anchor, q=reading.q, k=reading.k, v=reading.v,
                         output=reading.output, bias=reading.bias, nodes=tuple(reading.nodes))


__all__ = ["Detection", "Reject", "detect"]
