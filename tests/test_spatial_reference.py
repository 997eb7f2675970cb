"""The reference masks of the spatial variants against brute-force versions of their sources.

Each brute force follows the original code path (Swin's roll + region mask, MaxViT's reshape
partition, timm's zero-pad + unfold, NATTEN's per-query closed form), not our vectorised formulas,
so a wrong definition in `spatial_reference.py` cannot pass by agreeing with itself.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from attnrewrite.passes.spatial import reference as R


def _grid_block(allowed: np.ndarray, prefix: int) -> np.ndarray:
    return allowed[prefix:, prefix:]


# --- window / shifted window ----------------------------------------------------------------------


def _swin_allowed(h: int, w: int, ws: int, s: int) -> np.ndarray:
    """Swin V1 SW-MSA on the padded map (pad right/bottom to multiples of ws, roll by −s, partition,
    mask pairs from different regions), restricted to the real tokens: pad keys masked."""
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    region = np.zeros((hp, wp), int)
    slices = (slice(0, -ws), slice(-ws, -s), slice(-s, None)) if s else (slice(None),)
    for n, (a, b) in enumerate(itertools.product(slices, slices)):
        region[a, b] = n
    allowed = np.zeros((h * w, h * w), bool)
    for y1, x1, y2, x2 in itertools.product(range(hp), range(wp), range(hp), range(wp)):
        if (y1 // ws, x1 // ws) != (y2 // ws, x2 // ws) or region[y1, x1] != region[y2, x2]:
            continue
        oy1, ox1, oy2, ox2 = (y1 + s) % hp, (x1 + s) % wp, (y2 + s) % hp, (x2 + s) % wp  # undo the roll
        if max(oy1, oy2) < h and max(ox1, ox2) < w:
            allowed[oy1 * w + ox1, oy2 * w + ox2] = True
    return allowed


@pytest.mark.parametrize("h,w,ws", [(8, 8, 4), (6, 9, 3), (12, 8, 4), (10, 10, 5), (7, 5, 3), (9, 11, 4), (5, 5, 2)])
def test_shifted_windows_equal_swin_roll_and_mask(h, w, ws):
    for s in sorted({0, ws // 2, 1}):
        ours = _grid_block(R.allowed_window((h, w), 0, ws, (s, s)), 0)
        assert np.array_equal(ours, _swin_allowed(h, w, ws, s)), f"grid {h}x{w} window {ws} shift {s}"


def test_window_is_a_partition_with_partial_last_window():
    for length, size in itertools.product(range(1, 14), range(1, 9)):
        m = R.window_axis_mask(length, size)
        assert np.array_equal(m, m.T) and np.array_equal(m, (m.astype(int) @ m.astype(int)) > 0), "not an equivalence"
        sizes = sorted({int(c) for c in m.sum(1)})
        assert sizes[-1] == min(size, length) and (len(sizes) == 1 or length % size == sizes[0])


# --- neighbourhood / dilated / strided ---------------------------------------------------------------


def _natten_closed_form(length: int, k: int, d: int) -> np.ndarray:
    """ALGORITHMS.md §2, σ = 1: start = clamp(i' − ⌊k/2⌋, 0, L_g − k), keys g + d·(start + t)."""
    m = np.zeros((length, length), bool)
    for i in range(length):
        g, local = i % d, i // d
        lg = len(range(g, length, d))
        start = min(max(local - k // 2, 0), lg - k)
        for t in range(k):
            m[i, g + d * (start + t)] = True
    return m


def test_neighborhood_matches_natten_closed_form():
    for length, k, d in itertools.product(range(1, 24), range(1, 9), range(1, 5)):
        if k * d <= length:
            assert np.array_equal(R.neighborhood_axis_mask(length, k, d), _natten_closed_form(length, k, d)), (length, k, d)


def test_neighborhood_sees_exactly_k_keys_in_its_group_and_itself():
    for length, k, d in itertools.product(range(1, 20), range(1, 8), range(1, 4)):
        if k * d <= length:
            m = R.neighborhood_axis_mask(length, k, d)
            i, j = np.nonzero(m)
            assert (m.sum(1) == k).all() and m.diagonal().all() and ((i - j) % d == 0).all(), (length, k, d)


def test_neighborhood_2d_sees_exactly_kh_kw_grid_keys_plus_prefix():
    for grid, kernel, dil, prefix in [((7, 5), (3, 5), (2, 1), 2), ((11, 13), (4, 3), (1, 3), 1), ((6, 6), (6, 6), (1, 1), 0)]:
        allowed = R.allowed_neighborhood(grid, prefix, kernel, dil)
        assert (allowed[prefix:].sum(1) == prefix + kernel[0] * kernel[1]).all()


def test_strided_neighborhood_shares_windows_per_stride_group():
    """GNA: queries with the same leader attend to the same k keys (centre = clamped leader)."""
    for length, k, s in itertools.product(range(2, 18), range(1, 7), range(1, 7)):
        if k <= length and s <= k:
            m = R.neighborhood_axis_mask(length, k, 1, s)
            assert (m.sum(1) == k).all()
            for i in range(length):
                leader = min((i // s) * s + s // 2, length - 1)
                assert np.array_equal(m[i], R.neighborhood_axis_mask(length, k)[leader]), (length, k, s, i)


def test_window_equals_natten_blocked_mode_only_when_divisible():
    """W-MSA(w) ≡ GNA with stride = kernel = w when w divides the side; NATTEN clamps a partial block."""
    for w, blocks in itertools.product(range(1, 6), range(1, 5)):
        grid = (w * blocks, w * (blocks + 1))
        assert np.array_equal(R.allowed_window(grid, 1, w), R.allowed_neighborhood(grid, 1, w, stride=w))
    assert not np.array_equal(R.window_axis_mask(7, 3), R.neighborhood_axis_mask(7, 3, 1, 3))


def test_neighborhood_rejects_too_large_kernel():
    with pytest.raises(ValueError, match="exceeds"):
        R.neighborhood_axis_mask(7, 4, 2)


# --- MaxViT grid ----------------------------------------------------------------------------------


def _maxvit_grid_allowed(h: int, w: int, gh: int, gw: int) -> np.ndarray:
    """google-research/maxvit grid partition on the padded map: Reshape [G, Hp/G, G, Wp/G] →
    Transpose (1, 3, 0, 2) → windows of G×G; pad tokens dropped."""
    hp, wp = -(-h // gh) * gh, -(-w // gw) * gw
    ids = np.arange(hp * wp).reshape(hp, wp)
    windows = ids.reshape(gh, hp // gh, gw, wp // gw).transpose(1, 3, 0, 2).reshape(-1, gh * gw)
    allowed = np.zeros((h * w, h * w), bool)
    for win in windows:
        real = [(t // wp) * w + t % wp for t in win if t // wp < h and t % wp < w]
        allowed[np.ix_(real, real)] = True
    return allowed


@pytest.mark.parametrize("grid,size", [((8, 8), (4, 4)), ((6, 9), (3, 3)), ((7, 10), (3, 4)), ((11, 13), (4, 5)), ((5, 5), (5, 5))])
def test_grid_matches_maxvit_partition(grid, size):
    assert np.array_equal(_grid_block(R.allowed_grid(grid, 0, size), 0), _maxvit_grid_allowed(*grid, *size))


def test_grid_equals_dilated_neighborhood_when_divisible():
    """MaxViT grid(G) ≡ DiNA(k=G, d=H/G) (ALGORITHMS.md §4)."""
    for (gh, sh), (gw, sw) in itertools.product(itertools.product(range(1, 5), range(1, 4)), repeat=2):
        grid = (gh * sh, gw * sw)
        assert np.array_equal(R.allowed_grid(grid, 2, (gh, gw)), R.allowed_neighborhood(grid, 2, (gh, gw), (sh, sw)))


# --- HaloNet --------------------------------------------------------------------------------------


def _timm_halo(q, k, v, scale, grid, block, halo):
    """timm HaloAttn without rel-pos: zero-pad K/V maps by `halo` (and to a multiple of `block`),
    unfold (b+2h)² windows with step b, softmax per query block over its window."""
    (h, w), b = grid, block
    bt, heads, _, d = q.shape
    hp, wp = -(-h // b) * b, -(-w // b) * b

    def padded(x):
        out = np.zeros((bt, heads, hp + 2 * halo, wp + 2 * halo, x.shape[-1]))
        out[:, :, halo:halo + h, halo:halo + w] = x.reshape(bt, heads, h, w, -1)
        return out

    kp, vp, out = padded(k), padded(v), np.zeros((bt, heads, h, w, v.shape[-1]))
    qm = q.reshape(bt, heads, h, w, d).astype(np.float64)
    for by, bx in itertools.product(range(0, hp, b), range(0, wp, b)):
        kw = kp[:, :, by:by + b + 2 * halo, bx:bx + b + 2 * halo].reshape(bt, heads, -1, d)
        vw = vp[:, :, by:by + b + 2 * halo, bx:bx + b + 2 * halo].reshape(bt, heads, -1, v.shape[-1])
        qb = qm[:, :, by:by + b, bx:bx + b]
        ny, nx = qb.shape[2:4]
        logits = scale * qb.reshape(bt, heads, ny * nx, d) @ np.swapaxes(kw, -1, -2)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[:, :, by:by + ny, bx:bx + nx] = ((p / p.sum(-1, keepdims=True)) @ vw).reshape(bt, heads, ny, nx, -1)
    return out.reshape(bt, heads, h * w, -1)


@pytest.mark.parametrize("grid,block,halo", [((8, 8), 4, 1), ((6, 6), 2, 2), ((7, 9), 3, 1), ((5, 4), 2, 3)])
def test_halo_zero_border_equals_timm_zero_padding(grid, block, halo):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, grid[0] * grid[1], 4)) * 2 for _ in range(3))
    want = _timm_halo(q, k, v, 0.5, grid, block, halo)
    got = R.masked_attention(q, k, v, 0.5, R.allowed_halo(grid, 0, block, halo, "zero"),
                             zero_keys=R.halo_zero_keys(grid, 0, block, halo))
    err = np.abs(got - want).max()
    assert err <= 1e-12, f"max abs error {err:.3g}"


def test_halo_mask_border_keys_and_symmetry():
    for length, b, hl in itertools.product(range(1, 12), range(1, 5), range(0, 4)):
        m, zeros = R.halo_axis_mask(length, b, hl)
        assert (m.sum(1) + zeros == b + 2 * hl).all() and m.diagonal().all()
        if hl == 0:
            assert np.array_equal(m, m.T)


# --- anchors: configurations that are full attention -------------------------------------------------


@pytest.mark.parametrize("grid,prefix", [((7, 5), 1), ((4, 9), 0), ((6, 6), 5), ((11, 13), 2)])
def test_anchors_are_full_attention(grid, prefix):
    full = np.ones((prefix + grid[0] * grid[1],) * 2, bool)
    side = max(grid)
    assert R.allowed_window(grid, prefix, grid).all()
    assert R.allowed_window(grid, prefix, side).all()
    assert np.array_equal(R.allowed_neighborhood(grid, prefix, grid), full)
    assert np.array_equal(R.allowed_grid(grid, prefix, grid), full)
    assert np.array_equal(R.allowed_halo(grid, prefix, side, 0), full)
    assert np.array_equal(R.allowed_halo(grid, prefix, 2, side), full)
    assert np.array_equal(R.allowed_sliding_1d(prefix + 9, 9, prefix), np.ones((prefix + 9,) * 2, bool))
    assert np.array_equal(R.allowed_sliding_1d(prefix + 9, 40, prefix, mode="block"), np.ones((prefix + 9,) * 2, bool))


def test_prefix_modes():
    grid, prefix = (5, 6), 3
    g = R.allowed_neighborhood(grid, prefix, 3, prefix_mode="global")
    loc = R.allowed_neighborhood(grid, prefix, 3, prefix_mode="local")
    assert g[:prefix].all() and g[:, :prefix].all()
    assert loc[:prefix, :prefix].all() and not loc[:prefix, prefix:].any() and not loc[prefix:, :prefix].any()
    assert np.array_equal(g[prefix:, prefix:], loc[prefix:, prefix:])
    with pytest.raises(ValueError, match="prefix_mode"):
        R.allowed_window(grid, prefix, 2, prefix_mode="none")


def test_sliding_1d_window_is_the_total_key_count():
    for length, window in itertools.product(range(1, 20), range(1, 9)):
        centred = R.allowed_sliding_1d(length, window)
        assert (centred.sum(1) == min(window, length)).all()
        assert np.array_equal(centred, R.neighborhood_axis_mask(length, min(window, length)))
        assert np.array_equal(R.allowed_sliding_1d(length, window, mode="block"), R.window_axis_mask(length, window))
    # prefix tokens stay out of the sliding axis: token P is the first sequence position
    m = R.allowed_sliding_1d(12, 3, prefix=2)
    assert np.array_equal(m[2:, 2:], R.neighborhood_axis_mask(10, 3)) and m[:, :2].all()


# --- masked_attention ----------------------------------------------------------------------------


def test_masked_attention_full_mask_is_softmax_attention_and_zero_keys_are_explicit_zero_rows():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 10, 4)) for _ in range(3))
    bias = rng.standard_normal((1, 3, 10, 10))
    logits = 0.7 * q @ np.swapaxes(k, -1, -2) + bias
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v
    err = np.abs(R.masked_attention(q, k, v, 0.7, np.ones((10, 10), bool), bias) - want).max()
    assert err <= 1e-12, f"max abs error {err:.3g}"
    # two explicit zero keys appended to every row == zero_keys=2 (logit 0, value 0)
    kz = np.concatenate([k, np.zeros((2, 3, 2, 4))], axis=2)
    vz = np.concatenate([v, np.zeros((2, 3, 2, 4))], axis=2)
    allowed = np.ones((10, 12), bool)
    want = R.masked_attention(q, kz, vz, 0.7, allowed)
    got = R.masked_attention(q, k, v, 0.7, np.ones((10, 10), bool), zero_keys=np.full(10, 2))
    assert np.abs(got - want).max() <= 1e-12
    with pytest.raises(ValueError, match="no allowed key"):
        R.masked_attention(q, k, v, 0.7, np.eye(10, dtype=bool)[::-1] & False)
