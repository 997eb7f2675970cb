"""Static index tables for the spatial ONNX subgraphs: query tiles, key regions, carving masks.

Every variant runs as one computation: grid queries are grouped into tiles (a window, a MaxViT
group, a HaloNet block, or a run of neighbourhood queries); each tile gathers the union of its
queries' keys once (`key_index`), and where queries of a tile see different keys a static mask
carves each query's exact set out of that region. Because every variant is a product of per-axis
rules, the 2-D tables are outer products of 1-D tables (tile = row tile × column tile); the 1-D key
sets come from the masks of `spatial_reference.py`, so the math is defined in one place.

Neighbourhood tiles trade FLOPs against gather traffic: a run of t queries shares a region of
≈ t+k−1 keys, so logits cost (t+k−1)/k per axis over the exact k, while the K/V gather costs
(t+k−1)/t per axis over N. `choose_tiles` picks (t_y, t_x) minimising a measured cost model.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import NamedTuple

import numpy as np

from attnrewrite.passes.spatial import reference as R

#: Cost model for tile choice, in units of one logit (QKᵀ and PV multiply-adds, mask, softmax):
#: one gathered key slot (K and V gathers, GEMM packing of the K/V tile) costs about this many.
#: Least-squares fit of ORT 1.32 CPU site timings (2 threads, h=12, d=64; grids 24²-64², k 5-15,
#: tiles 2-16): median error 9 %; the pick is the measured best or within 15 % of it.
GATHER_COST_PER_KEY_SLOT = 30.0


@dataclasses.dataclass(frozen=True)
class AxisRule:
    """One axis as the tables see it: `mask[i, j]` (from the reference), query `tiles`, and for
    HaloNet's `border="zero"` the window `extent` (b+2h: positions outside the axis are zero keys)."""

    mask: np.ndarray
    tiles: tuple[tuple[int, ...], ...]
    extent: int | None = None

    @property
    def keys(self) -> list[list[int]]:
        return [np.flatnonzero(row).tolist() for row in self.mask]

    @property
    def zeros(self) -> list[int] | None:
        return None if self.extent is None else (self.extent - self.mask.sum(1)).tolist()


def _runs(ids: np.ndarray) -> list[tuple[int, ...]]:
    """Positions grouped by equal id, each group in increasing order, groups by first position."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(ids.tolist()):
        groups.setdefault(g, []).append(i)
    return [tuple(g) for g in groups.values()]


def window_axis(length: int, size: int, shift: int = 0) -> AxisRule:
    """Segments of the cut-point form; a partial first and last segment share one tile when they fit
    in a window (Swin's wrapped window: SW-MSA then needs no more tiles than W-MSA)."""
    mask = R.window_axis_mask(length, size, shift)
    tiles = _runs((np.arange(length) - shift % size) // size)
    if len(tiles) > 2 and len(tiles[0]) < size and len(tiles[0]) + len(tiles[-1]) <= size:
        tiles = [tiles[-1] + tiles[0], *tiles[1:-1]]
    return AxisRule(mask, tuple(tiles))


def neighborhood_axis(length: int, kernel: int, dilation: int = 1, tile: int | None = None, stride: int = 1) -> AxisRule:
    """Runs of `tile` consecutive queries inside each dilation group (DiNA's token permute as a
    table); `tile=None` picks the cheapest for a 1-D axis under the cost model."""
    mask = R.neighborhood_axis_mask(length, kernel, dilation, stride)
    if tile is None:
        tile = min(_axis_candidates(length, kernel, dilation, stride), key=lambda c: _cost(c.stats, (1, 1, 1))).tile
    return AxisRule(mask, _neighborhood_tiles(length, dilation, tile))


def _neighborhood_tiles(length: int, dilation: int, tile: int) -> tuple[tuple[int, ...], ...]:
    tiles = []
    for g in range(dilation):
        members = list(range(g, length, dilation))
        tiles += [tuple(members[a:a + tile]) for a in range(0, len(members), tile)]
    return tuple(tiles)


def grid_axis(length: int, size: int) -> AxisRule:
    mask = R.grid_axis_mask(length, size)
    return AxisRule(mask, tuple(_runs(np.arange(length) % -(-length // size))))


def halo_axis(length: int, block: int, halo: int, border: str = "mask") -> AxisRule:
    if border not in ("mask", "zero"):
        raise ValueError(f"{border=} must be mask or zero")
    mask, _ = R.halo_axis_mask(length, block, halo)
    tiles = tuple(tuple(range(a, min(a + block, length))) for a in range(0, length, block))
    return AxisRule(mask, tiles, block + 2 * halo if border == "zero" else None)


# --- tables ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AxisTable:
    """1-D tables: n tiles of ≤ tq queries, each with a key region of ≤ r keys."""

    query_index: np.ndarray  # [n, tq] axis position (pad slots repeat the tile's first query)
    query_real: np.ndarray  # [n, tq] bool
    key_index: np.ndarray  # [n, r] axis position (pad slots repeat the region's first key)
    allowed: np.ndarray  # [n, tq, r] bool (pad keys False; pad query rows = their stand-in's row)
    inside: np.ndarray  # [n, tq] allowed keys per query slot

    @property
    def stats(self) -> tuple[int, int, int]:
        """(logits per axis = n·tq·r, gathered key slots = n·r, query slots = n·tq)."""
        n, tq, r = self.allowed.shape
        return n * tq * r, n * r, n * tq


def axis_table(rule: AxisRule) -> AxisTable:
    tq = max(len(t) for t in rule.tiles)
    regions = [np.flatnonzero(rule.mask[list(t)].any(0)) for t in rule.tiles]
    r = max(len(reg) for reg in regions)
    query_index = np.array([list(t) + [t[0]] * (tq - len(t)) for t in rule.tiles], np.int64)
    query_real = np.array([[s < len(t) for s in range(tq)] for t in rule.tiles])
    key_index = np.array([list(reg) + [reg[0]] * (r - len(reg)) for reg in regions], np.int64)
    key_real = np.array([[s < len(reg) for s in range(r)] for reg in regions])
    allowed = rule.mask[query_index[:, :, None], key_index[:, None, :]] & key_real[:, None, :]
    return AxisTable(query_index, query_real, key_index, allowed, allowed.sum(2))


@dataclasses.dataclass(frozen=True)
class TileTables:
    """2-D tables over grid positions (prefix excluded): T tiles, Tq query slots, R key slots."""

    query_index: np.ndarray  # [T, Tq]
    key_index: np.ndarray  # [T, R]
    allowed: np.ndarray | None  # [T, Tq, R] bool; None when every slot is a real, allowed key
    inverse: np.ndarray  # [N] flat slot (tile·Tq + slot) holding each grid query
    zero_keys: np.ndarray | None  # [T, Tq] zero keys per query slot (halo border="zero")
    useful: int  # allowed (query, key) pairs over real queries

    @property
    def computed(self) -> int:
        return self.query_index.size * self.key_index.shape[1]

    @property
    def overhead(self) -> float:
        """Computed logits / useful logits: the FLOP overhead of this tiling (1.0 = none)."""
        return self.computed / self.useful

    @property
    def useful_fraction(self) -> float:
        return self.useful / self.computed

    @property
    def mask(self) -> np.ndarray | None:
        return self.additive_mask(np.float32)

    def additive_mask(self, dtype) -> np.ndarray | None:
        """[T, Tq, R] in `dtype`: 0 where allowed, `masked_value(dtype)` elsewhere; None if all allowed."""
        if self.allowed is None:
            return None
        return np.where(self.allowed, 0, masked_value(dtype)).astype(dtype)


def masked_value(dtype) -> float:
    """Large negative for masked logits: finite (no inf − inf = NaN) and far below any real logit,
    with room for a bias ≥ `bias_floor(dtype)` on top without overflowing to −inf."""
    import ml_dtypes

    return float(ml_dtypes.finfo(dtype).min) / 2


def bias_floor(dtype) -> float:
    """Biases are clamped to this: a −inf padding bias on every key of a window would otherwise make
    a NaN row (the dense original always had an unpadded key somewhere)."""
    import ml_dtypes

    return float(ml_dtypes.finfo(dtype).min) / 4


def build_tables(grid: tuple[int, int], rule_y: AxisRule, rule_x: AxisRule) -> TileTables:
    h, w = grid
    if rule_y.mask.shape != (h, h) or rule_x.mask.shape != (w, w):
        raise ValueError(f"axis rules {rule_y.mask.shape}, {rule_x.mask.shape} do not match {grid=}")
    ty, tx = axis_table(rule_y), axis_table(rule_x)
    (ny, qy), (nx, qx) = ty.query_index.shape, tx.query_index.shape
    ry, rx = ty.key_index.shape[1], tx.key_index.shape[1]
    query_index = (ty.query_index[:, None, :, None] * w + tx.query_index[None, :, None, :]).reshape(ny * nx, qy * qx)
    key_index = (ty.key_index[:, None, :, None] * w + tx.key_index[None, :, None, :]).reshape(ny * nx, ry * rx)
    allowed = (ty.allowed[:, None, :, None, :, None] & tx.allowed[None, :, None, :, None, :]).reshape(ny * nx, qy * qx, ry * rx)
    real = (ty.query_real[:, None, :, None] & tx.query_real[None, :, None, :]).reshape(-1)
    inverse = np.full(h * w, -1, np.int64)
    inverse[query_index.reshape(-1)[real]] = np.flatnonzero(real)
    assert np.all(inverse >= 0), "every grid query must belong to exactly one tile"
    zero_keys = None
    if rule_y.extent is not None or rule_x.extent is not None:
        ey = rule_y.extent if rule_y.extent is not None else ty.inside
        ex = rule_x.extent if rule_x.extent is not None else tx.inside
        ey, ex = np.broadcast_to(ey, ty.inside.shape), np.broadcast_to(ex, tx.inside.shape)
        zero_keys = (ey[:, None, :, None] * ex[None, :, None, :]
                     - ty.inside[:, None, :, None] * tx.inside[None, :, None, :]).reshape(ny * nx, qy * qx)
        if not zero_keys.any():
            zero_keys = None
    useful = int(rule_y.mask.sum()) * int(rule_x.mask.sum())
    return TileTables(query_index, key_index, None if allowed.all() else allowed, inverse, zero_keys, useful)


# --- neighbourhood tile choice ----------------------------------------------------------------------


class _Candidate(NamedTuple):
    tile: int
    stats: tuple[int, int, int]


def _axis_candidates(length: int, kernel: int, dilation: int, stride: int) -> list[_Candidate]:
    """Tile sizes worth modelling: every size up to 16, then a 1.25x geometric ladder up to 4k, and
    the whole group; with a stride, whole stride groups only (a split group recomputes its window)."""
    mask = R.neighborhood_axis_mask(length, kernel, dilation, stride)
    group_len = -(-length // dilation)
    ladder, m = set(range(1, 17)), 16.0
    while m < 4 * kernel:
        m *= 1.25
        ladder.add(math.ceil(m))
    tiles = {min(stride * m, group_len) for m in ladder if stride * m <= 4 * kernel} | {group_len}
    return [_Candidate(t, axis_stats(mask, _neighborhood_tiles(length, dilation, t))) for t in sorted(tiles)]


def axis_stats(mask: np.ndarray, tiles) -> tuple[int, int, int]:
    """`AxisTable.stats` without building the table: (n·tq·r, n·r, n·tq)."""
    n, tq = len(tiles), max(len(t) for t in tiles)
    r = max(int(mask[list(t)].any(0).sum()) for t in tiles)
    return n * tq * r, n * r, n * tq


def _cost(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """Modelled cost of the 2-D tiling a × b: logits + weighted gathered key slots."""
    return a[0] * b[0] + GATHER_COST_PER_KEY_SLOT * a[1] * b[1]


def choose_tiles(grid: tuple[int, int], kernel, dilation=(1, 1), stride=(1, 1)) -> tuple[int, int]:
    """(t_y, t_x) minimising the cost model over all tile sizes (exact per-axis table statistics)."""
    (h, w), (kh, kw), (dh, dw), (sh, sw) = grid, R.pair(kernel), R.pair(dilation), R.pair(stride)
    cy, cx = _axis_candidates(h, kh, dh, sh), _axis_candidates(w, kw, dw, sw)
    best = min(itertools.product(cy, cx), key=lambda p: (_cost(p[0].stats, p[1].stats), -p[0].tile * p[1].tile))
    return best[0].tile, best[1].tile


# --- 2-D rules per variant --------------------------------------------------------------------------


def rules_window(grid, size, shift=(0, 0)):
    (h, w), (sh, sw), (ah, aw) = R.pair(grid), R.pair(size), R.pair(shift)
    return window_axis(h, sh, ah), window_axis(w, sw, aw)


def rules_neighborhood(grid, kernel, dilation=(1, 1), tile=None, stride=(1, 1)):
    (h, w), (kh, kw), (dh, dw), (sh, sw) = R.pair(grid), R.pair(kernel), R.pair(dilation), R.pair(stride)
    th, tw = R.pair(tile) if tile is not None else choose_tiles((h, w), (kh, kw), (dh, dw), (sh, sw))
    return neighborhood_axis(h, kh, dh, th, sh), neighborhood_axis(w, kw, dw, tw, sw)


def rules_grid(grid, size):
    (h, w), (gh, gw) = R.pair(grid), R.pair(size)
    return grid_axis(h, gh), grid_axis(w, gw)


def rules_halo(grid, block, halo, border="mask"):
    (h, w), (bh, bw), (hh, hw) = R.pair(grid), R.pair(block), R.pair(halo)
    return halo_axis(h, bh, hh, border), halo_axis(w, bw, hw, border)


# --- 3-D grids (video: F×H×W) ------------------------------------------------------------------------


def merge_axes(outer: AxisRule, inner: AxisRule) -> AxisRule:
    """Two axes as one, position `i·len(inner) + j` (row-major): exact, because every variant's mask
    is a product of per-axis masks, so tiles, key regions and masks of the product are products too.
    A 3-D grid F×H×W is then the 2-D grid (F·H)×W for the tables and the emitter."""
    if outer.extent is not None or inner.extent is not None:
        raise ValueError("zero-padded (halo border=zero) axes cannot be merged")
    n = inner.mask.shape[0]
    tiles = tuple(tuple(i * n + j for i in a for j in b) for a in outer.tiles for b in inner.tiles)
    return AxisRule(np.kron(outer.mask, inner.mask), tiles)


def choose_tiles_nd(grid, kernel, dilation) -> tuple[int, ...]:
    """Per-axis tile sizes for an N-D neighbourhood minimising the same cost model as `choose_tiles`."""
    cands = [_axis_candidates(n, k, d, 1) for n, k, d in zip(grid, kernel, dilation)]

    def cost(combo):
        return (math.prod(c.stats[0] for c in combo) + GATHER_COST_PER_KEY_SLOT * math.prod(c.stats[1] for c in combo),
                -math.prod(c.tile for c in combo))

    return tuple(c.tile for c in min(itertools.product(*cands), key=cost))


def rules_window_3d(grid, size, shift=(0, 0, 0)):
    """(rule over F·H, rule over W) for Video-Swin-style windows on an F×H×W grid."""
    f, h, w = (window_axis(n, s, a) for n, s, a in zip(grid, size, shift))
    return merge_axes(f, h), w


def rules_neighborhood_3d(grid, kernel, dilation=(1, 1, 1), tile=None):
    """(rule over F·H, rule over W) for NATTEN's na3d neighbourhoods on an F×H×W grid."""
    tiles = tile if tile is not None else choose_tiles_nd(grid, kernel, dilation)
    f, h, w = (neighborhood_axis(n, k, d, t) for n, k, d, t in zip(grid, kernel, dilation, tiles))
    return merge_axes(f, h), w


# --- dense views of rules (tests, benchmarks) -------------------------------------------------------


def allowed_mask(grid, prefix: int, rule_y: AxisRule, rule_x: AxisRule, prefix_mode: str = "global") -> np.ndarray:
    return R.combine(grid, prefix, rule_y.mask, rule_x.mask, prefix_mode)


def zero_key_counts(grid, prefix: int, rule_y: AxisRule, rule_x: AxisRule) -> np.ndarray | None:
    if rule_y.extent is None and rule_x.extent is None:
        return None
    iy, ix = rule_y.mask.sum(1), rule_x.mask.sum(1)
    ey = rule_y.extent if rule_y.extent is not None else iy
    ex = rule_x.extent if rule_x.extent is not None else ix
    counts = np.zeros(prefix + grid[0] * grid[1], np.int64)
    counts[prefix:] = (np.outer(np.broadcast_to(ey, iy.shape), np.broadcast_to(ex, ix.shape)) - np.outer(iy, ix)).reshape(-1)
    return counts
