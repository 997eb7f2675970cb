"""The math of every spatial attention variant, as explicit boolean masks: the readable definition.

Token order is P prefix tokens (CLS, distillation, registers) then the N = H·W grid tokens row-major.
Every variant is a product of per-axis rules (ALGORITHMS.md §1-5): grid query (y, x) may attend to
grid key (y', x') iff `mask_y[y, y']` and `mask_x[x, x']`. The `*_axis_mask` functions below are
the definitions, written as vectorised formulas over positions; `allowed_*` turn them into dense
`bool[P+N, P+N]` matrices, and `masked_attention` (float64) is what every ONNX subgraph in
`spatial_emit.py` is tested against. The tables in `spatial_tables.py` are derived from these same
masks, so the tests' independent brute-force versions (Swin roll + mask, NATTEN leader/centre
form) check the definitions and the parity tests check the tiling.

Decisions (each named where it is made):

* Prefix tokens, `prefix_mode="global"` (default): prefix queries attend to all P+N keys, and every
  grid query attends to all P prefix keys plus its local set, under one softmax (NATTEN's
  `additional_keys` semantics). `"local"`: prefix ↔ grid is cut both ways; prefix queries attend
  only to prefix keys, grid queries only to their local set, so the grid part is exactly the pure
  variant.
* Window (Swin W-MSA / SW-MSA): the non-cyclic cut-point form; a grid the window does not divide
  ends in a partial window, which is "pad, then mask the padded keys" (not Swin's unmasked pads).
* Neighbourhood (NATTEN / DiNA / GNA stride): clamp semantics, every grid query sees exactly
  kh·kw grid keys; kernel·dilation ≤ side.
* MaxViT grid: stride ⌈L/G⌉ (pad to a multiple of G, padded tokens absent); groups of a
  non-divisible axis hold ⌈(L−r)/stride⌉ ≤ G tokens. Equals DiNA(k=G, d=L/G) only when G divides L.
* HaloNet: block b, halo h; non-divisible sides pad to a multiple of b. `border="mask"` drops keys
  outside the (unpadded) grid; `border="zero"` keeps them as zero vectors (timm), counted by
  `halo_zero_keys`: each takes softmax mass exp(0) and adds nothing to the output.
* 1-D sliding window (text): `window` is the TOTAL number of keys per query (NATTEN kernel size,
  `mode="centered"`: clamped at the ends, even windows have one more key on the left) or the
  block length (`mode="block"`: disjoint blocks, last one partial); a window longer than the
  sequence is clamped to it (full attention).
"""

from __future__ import annotations

import numpy as np

PREFIX_MODES = ("global", "local")


def pair(value, name: str = "value") -> tuple[int, int]:
    """An int or a pair of ints → (int, int)."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    out = tuple(int(v) for v in value)
    if len(out) != 2:
        raise ValueError(f"{name}={value!r} must be an int or a pair")
    return out


# --- per-axis rules: bool[L, L], row = query position, column = key position ----------------------


def window_axis_mask(length: int, size: int, shift: int = 0) -> np.ndarray:
    """Swin windows along one axis with cut points at s, s+w, s+2w, … (s = shift mod w; s = 0: w, 2w, …).

    Segment id ⌊(i − s)/w⌋ (−1 for the partial first part when s > 0); a query sees the keys of its
    segment. This is SW-MSA without the roll (ALGORITHMS.md §1); a trailing partial segment is the
    "pad + mask pad keys" form.
    """
    if size < 1:
        raise ValueError(f"{size=} must be >= 1")
    seg = (np.arange(length) - shift % size) // size
    return seg[:, None] == seg[None, :]


def neighborhood_axis_mask(length: int, kernel: int, dilation: int = 1, stride: int = 1) -> np.ndarray:
    """NATTEN neighbourhood along one axis (SHI-Labs/NATTEN flex mask, ALGORITHMS.md §2).

    Group g = i mod d, local coordinate i' = ⌊i/d⌋, group length L_g; left = ⌊k/2⌋,
    right = ⌊k/2⌋ + (k mod 2) − 1; leader ℓ = i' (stride 1) or min(⌊i'/σ⌋σ + ⌊σ/2⌋, L_g − 1);
    centre c = clamp(ℓ, left, L_g − 1 − right); keys are the group's local coordinates [c − left, c + right].
    """
    if kernel < 1 or dilation < 1 or stride < 1:
        raise ValueError(f"{kernel=}, {dilation=}, {stride=} must be >= 1")
    if kernel * dilation > length:
        raise ValueError(f"{kernel=} x {dilation=} exceeds the axis length {length}")
    if stride > kernel:
        raise ValueError(f"{stride=} must be <= {kernel=}")
    i = np.arange(length)
    group, local = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    leader = local if stride == 1 else np.minimum((local // stride) * stride + stride // 2, group_len - 1)
    centre = np.minimum(np.maximum(leader, left), group_len - 1 - right)
    lo, hi = centre - left, centre + right
    same_group = group[:, None] == group[None, :]
    return same_group & (local[None, :] >= lo[:, None]) & (local[None, :] <= hi[:, None])


def grid_axis_mask(length: int, size: int) -> np.ndarray:
    """MaxViT grid along one axis: G tokens strided by ⌈L/G⌉ (token i is in group i mod stride)."""
    if not 1 <= size <= length:
        raise ValueError(f"grid {size=} must be in [1, {length}]")
    group = np.arange(length) % -(-length // size)
    return group[:, None] == group[None, :]


def halo_axis_mask(length: int, block: int, halo: int) -> tuple[np.ndarray, np.ndarray]:
    """HaloNet along one axis: query block [a, a+b) sees keys [a−h, a+b+h).

    Returns (keys inside the grid, number of the b+2h window positions outside it); the latter are
    what timm's zero padding (and our padding of a non-divisible side) turns into zero keys.
    """
    if block < 1 or halo < 0:
        raise ValueError(f"{block=} must be >= 1 and {halo=} >= 0")
    i = np.arange(length)
    start = (i // block) * block
    mask = (i[None, :] >= start[:, None] - halo) & (i[None, :] < start[:, None] + block + halo)
    return mask, (block + 2 * halo) - mask.sum(1)


def sliding_axis_mask(length: int, window: int, mode: str = "centered", dilation: int = 1) -> np.ndarray:
    """1-D text: `centered` = NATTEN 1-D with `window` keys in total (DiNA with `dilation`);
    `block` = disjoint blocks."""
    if window < 1 or dilation < 1:
        raise ValueError(f"{window=} and {dilation=} must be >= 1")
    window = min(window, length // dilation)
    if mode == "centered":
        return neighborhood_axis_mask(length, window, dilation)
    if mode == "block" and dilation == 1:
        return window_axis_mask(length, window)
    raise ValueError(f"{mode=} must be centered or block")


# --- 2-D masks with prefix tokens ---------------------------------------------------------------


def combine(grid: tuple[int, int], prefix: int, mask_y: np.ndarray, mask_x: np.ndarray,
            prefix_mode: str = "global") -> np.ndarray:
    """bool[P+N, P+N] from per-axis masks: grid block = mask_y ⊗ mask_x (row-major tokens)."""
    if prefix_mode not in PREFIX_MODES:
        raise ValueError(f"{prefix_mode=} must be one of {PREFIX_MODES}")
    h, w = grid
    if mask_y.shape != (h, h) or mask_x.shape != (w, w):
        raise ValueError(f"axis masks {mask_y.shape}, {mask_x.shape} do not match {grid=}")
    n = prefix + h * w
    allowed = np.zeros((n, n), dtype=bool)
    allowed[prefix:, prefix:] = np.kron(mask_y, mask_x)
    allowed[:prefix, :prefix] = True
    if prefix_mode == "global":
        allowed[:prefix, :] = True
        allowed[:, :prefix] = True
    return allowed


def combine_nd(grid: tuple[int, ...], prefix: int, masks: list[np.ndarray], prefix_mode: str = "global") -> np.ndarray:
    """bool[P+N, P+N] for any number of axes: grid block = mask_0 ⊗ mask_1 ⊗ … (row-major tokens)."""
    if prefix_mode not in PREFIX_MODES:
        raise ValueError(f"{prefix_mode=} must be one of {PREFIX_MODES}")
    if [m.shape for m in masks] != [(n, n) for n in grid]:
        raise ValueError(f"axis masks {[m.shape for m in masks]} do not match {grid=}")
    block = masks[0]
    for m in masks[1:]:
        block = np.kron(block, m)
    n = prefix + block.shape[0]
    allowed = np.zeros((n, n), dtype=bool)
    allowed[prefix:, prefix:] = block
    allowed[:prefix, :prefix] = True
    if prefix_mode == "global":
        allowed[:prefix, :] = True
        allowed[:, :prefix] = True
    return allowed


def allowed_window_3d(grid, prefix: int, size, shift=(0, 0, 0), prefix_mode: str = "global") -> np.ndarray:
    """Video Swin: F×H×W windows (cut-point form of the cyclic shift on every axis)."""
    return combine_nd(tuple(grid), prefix, [window_axis_mask(n, s, a) for n, s, a in zip(grid, size, shift)],
                      prefix_mode)


def allowed_neighborhood_3d(grid, prefix: int, kernel, dilation=(1, 1, 1), prefix_mode: str = "global") -> np.ndarray:
    """NATTEN na3d: each token sees Kf×Kh×Kw neighbours, clamped at every border, dilated per axis."""
    return combine_nd(tuple(grid), prefix, [neighborhood_axis_mask(n, k, d) for n, k, d in zip(grid, kernel, dilation)],
                      prefix_mode)


def allowed_window(grid, prefix: int, size, shift=(0, 0), prefix_mode: str = "global") -> np.ndarray:
    (h, w), (sh, sw), (ah, aw) = pair(grid), pair(size, "size"), pair(shift, "shift")
    return combine((h, w), prefix, window_axis_mask(h, sh, ah), window_axis_mask(w, sw, aw), prefix_mode)


def allowed_neighborhood(grid, prefix: int, kernel, dilation=(1, 1), prefix_mode: str = "global",
                         stride=(1, 1)) -> np.ndarray:
    (h, w), (kh, kw) = pair(grid), pair(kernel, "kernel")
    (dh, dw), (sh, sw) = pair(dilation, "dilation"), pair(stride, "stride")
    return combine((h, w), prefix, neighborhood_axis_mask(h, kh, dh, sh), neighborhood_axis_mask(w, kw, dw, sw),
                   prefix_mode)


def allowed_grid(grid, prefix: int, size, prefix_mode: str = "global") -> np.ndarray:
    (h, w), (gh, gw) = pair(grid), pair(size, "size")
    return combine((h, w), prefix, grid_axis_mask(h, gh), grid_axis_mask(w, gw), prefix_mode)


def allowed_halo(grid, prefix: int, block, halo, border: str = "mask", prefix_mode: str = "global") -> np.ndarray:
    """Keys inside the grid. With `border="zero"` also pass `halo_zero_keys(...)` to `masked_attention`."""
    if border not in ("mask", "zero"):
        raise ValueError(f"{border=} must be mask or zero")
    (h, w), (bh, bw), (hh, hw) = pair(grid), pair(block, "block"), pair(halo, "halo")
    return combine((h, w), prefix, halo_axis_mask(h, bh, hh)[0], halo_axis_mask(w, bw, hw)[0], prefix_mode)


def halo_zero_keys(grid, prefix: int, block, halo) -> np.ndarray:
    """int[P+N]: zero keys per query for `border="zero"`: window area minus its in-grid part."""
    (h, w), (bh, bw), (hh, hw) = pair(grid), pair(block, "block"), pair(halo, "halo")
    my, _ = halo_axis_mask(h, bh, hh)
    mx, _ = halo_axis_mask(w, bw, hw)
    inside = np.outer(my.sum(1), mx.sum(1)).reshape(-1)
    counts = np.zeros(prefix + h * w, dtype=np.int64)
    counts[prefix:] = (bh + 2 * hh) * (bw + 2 * hw) - inside
    return counts


def allowed_sliding_1d(length: int, window: int, prefix: int = 0, mode: str = "centered",
                       prefix_mode: str = "global", dilation: int = 1) -> np.ndarray:
    """`length` = all tokens (prefix included); the sliding rule applies to the last length − P."""
    return combine((1, length - prefix), prefix, np.ones((1, 1), bool),
                   sliding_axis_mask(length - prefix, window, mode, dilation), prefix_mode)


# --- attention ------------------------------------------------------------------------------------


def masked_attention(q, k, v, scale: float, allowed: np.ndarray, bias=None, zero_keys=None) -> np.ndarray:
    """softmax(scale·QKᵀ + bias) V over the allowed keys, in float64.

    `zero_keys[i]` extra keys per query have logit exactly 0 (no scale, no bias: they are not tokens
    of the site) and value 0: they only add exp(0) each to the softmax denominator.
    """
    if not allowed.any(-1).all():
        raise ValueError("a query row has no allowed key")
    logits = scale * np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2))
    if bias is not None:
        logits = logits + np.asarray(bias, dtype=np.float64)
    logits = np.where(allowed, logits, -np.inf)
    top = np.max(logits, axis=-1, keepdims=True)
    if zero_keys is not None:
        top = np.maximum(top, np.where(np.asarray(zero_keys)[:, None] > 0, 0.0, -np.inf))
    weights = np.exp(logits - top)
    denom = weights.sum(-1, keepdims=True)
    if zero_keys is not None:
        denom = denom + np.asarray(zero_keys)[:, None] * np.exp(-top)
    return np.matmul(weights / denom, v.astype(np.float64))
