"""The math of every spatial variant, defined once: which keys each query may attend to.

Every variant is a product of per-axis rules (ALGORITHMS.md §1-5): a 2-D query (y, x) may attend to
key (y', x') iff y' ∈ keys_y(y) and x' ∈ keys_x(x). The per-axis rules below are the definition;
`allowed_mask` turns them into a dense boolean matrix and `masked_attention` is the reference the
ONNX subgraphs are tested against. Prefix tokens (CLS, registers) come first in the token order:
with `prefix_mode="global"` they attend to everything and every grid query also attends to them;
with `"local"` they only attend to each other and grid queries do not see them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class AxisRule:
    """Per-axis semantics: `keys[i]` = key positions query i sees, `zeros[i]` = zero-padded keys it
    also sees (HaloNet's border="zero": they take softmax mass with logit 0 and add nothing),
    `tiles` = a partition of the queries into groups that share most of their keys."""

    keys: list[list[int]]
    tiles: list[list[int]]
    zeros: list[int] | None = None


# --- per-axis rules -----------------------------------------------------------------------------


def window_axis(length: int, size: int, shift: int = 0) -> AxisRule:
    """Swin windows with cut points at shift, shift+size, ...: the non-cyclic form of SW-MSA.

    A grid that `size` does not divide ends in a partial window, which is exactly "pad, then mask
    the padded keys".
    """
    cuts = sorted({0, length, *range(shift % size if shift else size, length, size)})
    segments = [list(range(a, b)) for a, b in zip(cuts, cuts[1:]) if b > a]
    keys = [[] for _ in range(length)]
    for seg in segments:
        for i in seg:
            keys[i] = seg
    return AxisRule(keys=keys, tiles=segments)


def neighborhood_axis(length: int, kernel: int, dilation: int = 1, tile: int | None = None) -> AxisRule:
    """NATTEN: exactly `kernel` keys per query in its dilation group, window clamped at borders.

    Group g = i mod d, local coordinate i' = i // d, group length L_g;
    start = clamp(i' − ⌊k/2⌋, 0, L_g − k), keys g + d·(start + t) for t < k (ALGORITHMS.md §2).
    """
    if kernel * dilation > length:
        raise ValueError(f"{kernel=} x {dilation=} exceeds axis length {length}")
    keys = [[] for _ in range(length)]
    tiles = []
    tile = tile or max(1, min(kernel, math.ceil(kernel / 2)))
    for g in range(dilation):
        members = list(range(g, length, dilation))
        lg = len(members)
        for local, i in enumerate(members):
            start = min(max(local - kernel // 2, 0), lg - kernel)
            keys[i] = [g + dilation * (start + t) for t in range(kernel)]
        tiles += [members[a:a + tile] for a in range(0, lg, tile)]
    return AxisRule(keys=keys, tiles=tiles)


def grid_axis(length: int, size: int) -> AxisRule:
    """MaxViT grid: `size` tokens per group strided across the axis (stride ⌈L/size⌉).

    Non-divisible axes use the padded stride ⌈L/G⌉ with padded tokens absent (documented choice).
    """
    stride = math.ceil(length / size)
    groups = [list(range(r, length, stride)) for r in range(stride)]
    keys = [[] for _ in range(length)]
    for grp in groups:
        for i in grp:
            keys[i] = grp
    return AxisRule(keys=keys, tiles=[g for g in groups if g])


def halo_axis(length: int, block: int, halo: int, border: str = "mask") -> AxisRule:
    """HaloNet: query block [a, a+b) sees keys [a−h, a+b+h); outside the axis the keys are masked
    (`border="mask"`) or zero vectors that still take softmax mass (`border="zero"`, timm)."""
    tiles = [list(range(a, min(a + block, length))) for a in range(0, length, block)]
    keys = [[] for _ in range(length)]
    zeros = [0] * length
    for tile in tiles:
        a = tile[0]
        lo, hi = a - halo, a + block + halo
        inside = list(range(max(lo, 0), min(hi, length)))
        for i in tile:
            keys[i] = inside
            zeros[i] = (hi - lo) - len(inside)
    return AxisRule(keys=keys, tiles=tiles, zeros=zeros if border == "zero" else None)


# --- dense reference ----------------------------------------------------------------------------


def allowed_mask(grid: tuple[int, int], prefix: int, rule_y: AxisRule, rule_x: AxisRule,
                 prefix_mode: str = "global") -> np.ndarray:
    """bool[P+N, P+N]: may query i attend to key j (grid tokens row-major after P prefix tokens)."""
    h, w = grid
    n = prefix + h * w
    allowed = np.zeros((n, n), dtype=bool)
    ay = np.zeros((h, h), dtype=bool)
    ax = np.zeros((w, w), dtype=bool)
    for i in range(h):
        ay[i, rule_y.keys[i]] = True
    for i in range(w):
        ax[i, rule_x.keys[i]] = True
    allowed[prefix:, prefix:] = np.einsum("ac,bd->abcd", ay, ax).reshape(h * w, h * w)
    allowed[:prefix, :prefix] = True
    if prefix_mode == "global":
        allowed[:prefix, :] = True
        allowed[:, :prefix] = True
    return allowed


def zero_key_counts(grid: tuple[int, int], prefix: int, rule_y: AxisRule, rule_x: AxisRule) -> np.ndarray | None:
    """Zero-padded keys per query (2-D window count minus in-image count), or None."""
    if rule_y.zeros is None and rule_x.zeros is None:
        return None
    h, w = grid
    counts = np.zeros(prefix + h * w, dtype=np.int64)
    for y in range(h):
        for x in range(w):
            ny = len(rule_y.keys[y]) + (rule_y.zeros[y] if rule_y.zeros else 0)
            nx = len(rule_x.keys[x]) + (rule_x.zeros[x] if rule_x.zeros else 0)
            counts[prefix + y * w + x] = ny * nx - len(rule_y.keys[y]) * len(rule_x.keys[x])
    return counts


def masked_attention(q, k, v, scale: float, allowed: np.ndarray, bias=None, zero_keys=None) -> np.ndarray:
    """softmax over allowed keys (plus `zero_keys` extra keys of logit 0 and value 0), float64."""
    logits = scale * np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2))
    if bias is not None:
        logits = logits + bias.astype(np.float64)
    logits = np.where(allowed, logits, -np.inf)
    top = np.max(logits, axis=-1, keepdims=True)
    if zero_keys is not None:
        top = np.maximum(top, np.where(zero_keys[:, None] > 0, 0.0, -np.inf))
    weights = np.exp(logits - top)
    denom = weights.sum(-1, keepdims=True)
    if zero_keys is not None:
        denom = denom + zero_keys[:, None] * np.exp(-top)
    return np.matmul(weights / denom, v.astype(np.float64))


RuleFactory = Callable[[int], AxisRule]
