"""Attention weights before and after a rewrite, for a few query tokens: what the HTML report draws.

The original weights are softmax(scale·QKᵀ + bias) on calibration Q/K. The rewritten weights are read
off the emitted ONNX itself rather than recomputed from a pass's own reference: the site's rewrite is
emitted alone (same plan, same fitted constants) and run with V set to blocks of the identity, so the
output *is* the effective weight matrix A of O = A·V. That holds for every variant here (windows,
neighbourhoods, linear maps, block-sparse tables: A never depends on V); quantised P·V rounds V, and
one-hot V rounds exactly, so the map shows the quantised P̃.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from attnrewrite.validate import lone
from attnrewrite.validate.runner import cpu_session

#: sites drawn per pass, query tokens drawn per site
MAX_SITES, MAX_QUERIES = 3, 3


@dataclasses.dataclass(frozen=True)
class AttentionMap:
    """Head-mean weights of a few queries over every key: `before`/`after` [queries, N]."""

    site: str
    label: str
    grid: tuple[int, ...] | None
    prefix: int
    queries: tuple[int, ...]
    before: np.ndarray
    after: np.ndarray
    image: np.ndarray | None  # [H, W, 3] in 0..1: the vision input the grid covers


def query_tokens(n: int, grid, prefix: int) -> tuple[int, ...]:
    """A prefix token (CLS) when there is one, the grid's centre and its top-left corner (tokens 0,
    N/2 and N−1 on a sequence)."""
    if grid is not None and len(grid) == 2:
        h, w = grid
        picks = ([0] if prefix else []) + [prefix + (h // 2) * w + w // 2, prefix]
    else:
        picks = [0, n // 2, n - 1]
    return tuple(dict.fromkeys(picks))[:MAX_QUERIES]


def softmax_weights(q: np.ndarray, k: np.ndarray, scale: float, bias: np.ndarray | None) -> np.ndarray:
    """[h, Nq, Nk] for one sample, in float64."""
    logits = scale * q.astype(np.float64) @ np.swapaxes(k.astype(np.float64), -1, -2)
    if bias is not None:
        logits = logits + bias
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def effective_weights(model: ir.Model, spec, site, plan, q: np.ndarray, k: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The rewritten site's weights [h, Nq, Nk] on one sample (q, k: [1, h, N, d]), via V = identity blocks."""
    heads, n, _ = q.shape[1:]
    dv = site.v.shape[3] if site.v.shape is not None and isinstance(site.v.shape[3], int) else q.shape[3]
    shapes = {"q": q.shape, "k": k.shape, "v": (1, heads, k.shape[2], dv), **({"bias": bias.shape} if bias is not None else {})}
    session = cpu_session(lone.rewritten(model, spec, site, plan, shapes).SerializeToString())
    weights = np.zeros((heads, n, k.shape[2]))
    for start in range(0, k.shape[2], dv):
        width = min(dv, k.shape[2] - start)
        v = np.zeros((1, heads, k.shape[2], dv), np.float32)
        v[0, :, np.arange(start, start + width), np.arange(width)] = 1.0
        feeds = {"q": q.astype(np.float32), "k": k.astype(np.float32), "v": v}
        if bias is not None:
            feeds["bias"] = bias.astype(np.float32)
        weights[:, :, start:start + width] = session.run(["out"], feeds)[0][0, :, :, :width]
    return weights


def collect(model: ir.Model, base_dir, spec, rewrites, batch: dict[str, np.ndarray], order: list[str]) -> list[AttentionMap]:
    """Maps for up to MAX_SITES rewritten sites (in `order`: most sensitive first when measured) on
    the first sample of `batch`."""
    chosen = sorted(rewrites, key=lambda r: order.index(r.site.id) if r.site.id in order else len(order))[:MAX_SITES]
    values = lone.site_activations(model, base_dir, [r.site for r in chosen], batch, roles=("q", "k"))
    image = _image({name: value[:1] for name, value in batch.items()})
    maps = []
    for r in sorted(chosen, key=lambda r: r.site.layer):
        site = r.site
        q, k = values[site.q.name][:1], values[site.k.name][:1]
        bias = values[site.bias.name][:1] if site.bias is not None else None
        n = q.shape[2]
        prefix = site.prefix_tokens or 0
        queries = query_tokens(n, site.grid, prefix)
        before = softmax_weights(q[0], k[0], site.scale, None if bias is None else np.broadcast_to(
            bias, (1, q.shape[1], n, k.shape[2]))[0]).mean(0)
        after = effective_weights(model, spec, site, r.plan, q, k, bias).mean(0)
        maps.append(AttentionMap(site.id, spec.label(), site.grid, prefix, queries, before[list(queries)],
                                 after[list(queries)], image if site.vision else None))
    return maps


def _image(batch: dict[str, np.ndarray]) -> np.ndarray | None:
    """The first image-like input ([1, 3, H, W]) as HWC in 0..1, for drawing maps over it."""
    for value in batch.values():
        if value.ndim == 4 and value.shape[1] == 3 and np.issubdtype(value.dtype, np.floating):
            img = value[0].transpose(1, 2, 0).astype(np.float64)
            lo, hi = img.min(), img.max()
            return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return None

