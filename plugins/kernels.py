"""Fused attention kernels (Triton), one per variant family, all with online softmax.

Tensors are the AttentionSite layout `[B, h, P + N, d]` (P prefix tokens first, then the N = H·W
grid tokens row-major), contiguous in the last axis; every kernel writes the same layout. Logits use
exp2 with `log2(e)·scale` folded into one multiplier. Accumulation is float32 whatever the I/O dtype.

The semantics are those of the ONNX passes, defined in `passes/spatial/reference.py` and
`passes/paro.py` / `passes/quantize.py`, and `attnrewrite.plugins.check` tests every kernel against
those references:

* prefix tokens are global: prefix queries attend to every key (extra programs after the tiles run
  them as dense rows), every grid query attends to all prefix keys plus its local set, one softmax;
* `window_attention`: Swin W-MSA/SW-MSA in the cut-point form (shift s: segments [0, s), [s, s+w), …),
  the last partial window masked;
* `neighborhood_attention`: NATTEN clamp semantics with dilation (each dilation group is tiled
  separately; a tile gathers the union of its queries' windows and masks each query's exact set);
  1-D is a 1×L grid;
* `block_sparse_attention`: PARO tables (per-head token order + a fixed number of kept key blocks per
  query block) with global tokens, Q·Kᵀ on int8 (per-token scales, as `granularity=token`; ±7 for
  the INT4 range) and P·V on int8 (P̃ = exp(s − running max) at 1/127, V per channel per key block),
  optional K smoothing by a given token mean.

This file is imported by `attnrewrite.plugins.loader`, never directly: Triton decides at decoration
time whether a kernel is compiled or interpreted, so the loader executes this source once per mode.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(base, tokens, valid, stride_n, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `tokens` of a `[tokens, D]` matrix at `base`, zero where not valid (and beyond D)."""
    d = tl.arange(0, BLOCK_D)
    ptrs = base + tokens[:, None].to(tl.int64) * stride_n + d[None, :]
    return tl.load(ptrs, mask=valid[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _online_update(acc, m_i, l_i, s, v):
    """One flash-attention step: `s` [M, N] base-2 logits (-inf where masked), `v` [N, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _logits(q, k, qk_scale):
    return tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale


@triton.jit
def _store_rows(base, tokens, valid, acc, l_i, stride_n, D: tl.constexpr, BLOCK_D: tl.constexpr):
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    d = tl.arange(0, BLOCK_D)
    ptrs = base + tokens[:, None].to(tl.int64) * stride_n + d[None, :]
    tl.store(ptrs, out.to(base.dtype.element_ty), mask=valid[:, None] & (d[None, :] < D))


@triton.jit
def _attend_range(q, acc, m_i, l_i, k_base, v_base, key0, n_keys, stride_n, qk_scale,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Every query attends to the contiguous keys [key0, key0 + n_keys) (prefix keys, dense rows)."""
    for start in range(0, n_keys, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        ok = j < n_keys
        k = _load_rows(k_base, key0 + j, ok, stride_n, D, BLOCK_D)
        v = _load_rows(v_base, key0 + j, ok, stride_n, D, BLOCK_D)
        s = tl.where(ok[None, :], _logits(q, k, qk_scale), float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v)
    return acc, m_i, l_i


@triton.jit
def _attend_first(q, k_base, v_base, n_keys, stride_n, qk_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fresh online-softmax state after attending to keys [0, n_keys): the prefix (global) keys every
    query sees, or all keys for the dense prefix rows."""
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    return _attend_range(q, acc, m_i, l_i, k_base, v_base, 0, n_keys, stride_n, qk_scale, D, BLOCK_N, BLOCK_D)


@triton.jit
def _dense_rows(q_base, k_base, v_base, o_base, row0, n_rows, n_keys, stride_n, qk_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [row0, row0 + BLOCK_M) ∩ [0, n_rows) attend to all keys: the global (prefix) queries."""
    rows = row0 + tl.arange(0, BLOCK_M)
    ok = rows < n_rows
    q = _load_rows(q_base, rows, ok, stride_n, D, BLOCK_D)
    acc, m_i, l_i = _attend_first(q, k_base, v_base, n_keys, stride_n, qk_scale, D, BLOCK_M, BLOCK_N, BLOCK_D)
    _store_rows(o_base, rows, ok, acc, l_i, stride_n, D, BLOCK_D)


@triton.jit
def window_attention(q_ptr, k_ptr, v_ptr, o_ptr, stride_b, stride_h, stride_n, heads, P, GH, GW, WY, WX, SY, SX,
                     n_windows_x, n_tiles, chunks, qk_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    _window_program(q_ptr, k_ptr, v_ptr, o_ptr, stride_b, stride_h, stride_n, heads, P, GH, GW, WY, WX, SY, SX,
                    n_windows_x, n_tiles, chunks, qk_scale, D, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def window_attention_trt(q_ptr, k_ptr, v_ptr, heads, N, P, GH, GW, WY, WX, SY, SX, n_windows_x, n_tiles, chunks, o_ptr,
                         QK_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """TensorRT's argument order (inputs, int32 scalars, outputs) on contiguous `[B, h, N, d]` tensors;
    the scale is compiled in, since an AOT plugin's scalar arguments are int32 only."""
    _window_program(q_ptr, k_ptr, v_ptr, o_ptr, heads * N * D, N * D, D, heads, P, GH, GW, WY, WX, SY, SX,
                    n_windows_x, n_tiles, chunks, QK_SCALE, D, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _window_program(q_ptr, k_ptr, v_ptr, o_ptr, stride_b, stride_h, stride_n, heads, P, GH, GW, WY, WX, SY, SX,
                    n_windows_x, n_tiles, chunks, qk_scale,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (tile, b·h): a tile is BLOCK_M queries of one window (window = segment_y × segment_x);
    programs past `n_tiles` are the prefix queries' dense rows."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    off = (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h
    q_base, k_base, v_base, o_base = q_ptr + off, k_ptr + off, v_ptr + off, o_ptr + off
    if pid >= n_tiles:
        _dense_rows(q_base, k_base, v_base, o_base, (pid - n_tiles) * BLOCK_M, P, P + GH * GW, stride_n, qk_scale,
                    D, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        win, chunk = pid // chunks, pid % chunks
        wy, wx = win // n_windows_x, win % n_windows_x
        # cut points s, s+w, …: with a shift, segment 0 is the partial [0, s)
        y0 = tl.where(SY > 0, tl.maximum(SY + (wy - 1) * WY, 0), wy * WY)
        y1 = tl.minimum(tl.where(SY > 0, SY + wy * WY, (wy + 1) * WY), GH)
        x0 = tl.where(SX > 0, tl.maximum(SX + (wx - 1) * WX, 0), wx * WX)
        x1 = tl.minimum(tl.where(SX > 0, SX + wx * WX, (wx + 1) * WX), GW)
        width = x1 - x0
        area = (y1 - y0) * width
        m = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
        q_ok = m < area
        q_tok = P + (y0 + m // width) * GW + x0 + m % width
        q = _load_rows(q_base, q_tok, q_ok, stride_n, D, BLOCK_D)
        acc, m_i, l_i = _attend_first(q, k_base, v_base, P, stride_n, qk_scale, D, BLOCK_M, BLOCK_N, BLOCK_D)
        for start in range(0, area, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            ok = j < area
            k_tok = P + (y0 + j // width) * GW + x0 + j % width
            k = _load_rows(k_base, k_tok, ok, stride_n, D, BLOCK_D)
            v = _load_rows(v_base, k_tok, ok, stride_n, D, BLOCK_D)
            s = tl.where(ok[None, :], _logits(q, k, qk_scale), float("-inf"))
            acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v)
        _store_rows(o_base, q_tok, q_ok, acc, l_i, stride_n, D, BLOCK_D)


@triton.jit
def _clamped_start(local, group_len, KERNEL):
    """NATTEN (stride 1): the first key of a query's window, clamped so it holds `KERNEL` keys."""
    return tl.minimum(tl.maximum(local - KERNEL // 2, 0), group_len - KERNEL)


@triton.jit
def neighborhood_attention(q_ptr, k_ptr, v_ptr, o_ptr, stride_b, stride_h, stride_n, heads, P, GH, GW, KY, KX, DY, DX,
                           tiles_y, tiles_x, n_tiles, qk_scale,
                           D: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    _neighborhood_program(q_ptr, k_ptr, v_ptr, o_ptr, stride_b, stride_h, stride_n, heads, P, GH, GW, KY, KX, DY, DX,
                          tiles_y, tiles_x, n_tiles, qk_scale, D, TY, TX, BLOCK_N, BLOCK_D)


@triton.jit
def neighborhood_attention_trt(q_ptr, k_ptr, v_ptr, heads, N, P, GH, GW, KY, KX, DY, DX, tiles_y, tiles_x, n_tiles,
                               o_ptr, QK_SCALE: tl.constexpr, D: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """TensorRT's argument order and contiguous tensors, as `window_attention_trt`."""
    _neighborhood_program(q_ptr, k_ptr, v_ptr, o_ptr, heads * N * D, N * D, D, heads, P, GH, GW, KY, KX, DY, DX,
                          tiles_y, tiles_x, n_tiles, QK_SCALE, D, TY, TX, BLOCK_N, BLOCK_D)


@triton.jit
def _neighborhood_program(q_ptr, k_ptr, v_ptr, o_ptr, stride_b, stride_h, stride_n, heads, P, GH, GW, KY, KX, DY, DX,
                          tiles_y, tiles_x, n_tiles, qk_scale,
                          D: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Program (tile, b·h): a TY×TX tile of one dilation group's local coordinates; it visits the
    union of its queries' windows (≤ (TY+KY−1)·(TX+KX−1) keys) and masks each query's own window."""
    BLOCK_M: tl.constexpr = TY * TX
    pid, bh = tl.program_id(0), tl.program_id(1)
    off = (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h
    q_base, k_base, v_base, o_base = q_ptr + off, k_ptr + off, v_ptr + off, o_ptr + off
    if pid >= n_tiles:
        _dense_rows(q_base, k_base, v_base, o_base, (pid - n_tiles) * BLOCK_M, P, P + GH * GW, stride_n, qk_scale,
                    D, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        row, col = pid // (DX * tiles_x), pid % (DX * tiles_x)
        gy, ty = row // tiles_y, row % tiles_y
        gx, tx = col // tiles_x, col % tiles_x
        len_y = (GH - gy + DY - 1) // DY
        len_x = (GW - gx + DX - 1) // DX
        m = tl.arange(0, BLOCK_M)
        qy, qx = ty * TY + m // TX, tx * TX + m % TX
        q_ok = (qy < len_y) & (qx < len_x)
        q_tok = P + (gy + DY * qy) * GW + gx + DX * qx
        start_y, start_x = _clamped_start(qy, len_y, KY), _clamped_start(qx, len_x, KX)
        # the tile's key region: from the first query's window start to the last valid query's end
        ry0 = _clamped_start(ty * TY, len_y, KY)
        ry1 = _clamped_start(tl.minimum(ty * TY + TY, len_y) - 1, len_y, KY) + KY
        rx0 = _clamped_start(tx * TX, len_x, KX)
        rx1 = _clamped_start(tl.minimum(tx * TX + TX, len_x) - 1, len_x, KX) + KX
        width = rx1 - rx0
        area = (ry1 - ry0) * width
        q = _load_rows(q_base, q_tok, q_ok, stride_n, D, BLOCK_D)
        acc, m_i, l_i = _attend_first(q, k_base, v_base, P, stride_n, qk_scale, D, BLOCK_M, BLOCK_N, BLOCK_D)
        for start in range(0, area, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            ok = j < area
            ky, kx = ry0 + j // width, rx0 + j % width
            k_tok = P + (gy + DY * ky) * GW + gx + DX * kx
            k = _load_rows(k_base, k_tok, ok, stride_n, D, BLOCK_D)
            v = _load_rows(v_base, k_tok, ok, stride_n, D, BLOCK_D)
            inside = ((ky[None, :] >= start_y[:, None]) & (ky[None, :] < start_y[:, None] + KY)
                      & (kx[None, :] >= start_x[:, None]) & (kx[None, :] < start_x[:, None] + KX))
            s = tl.where(inside & ok[None, :], _logits(q, k, qk_scale), float("-inf"))
            acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v)
        _store_rows(o_base, q_tok, q_ok, acc, l_i, stride_n, D, BLOCK_D)


@triton.jit
def _round(x):
    """Round half to even, like numpy's `rint` and ONNX QuantizeLinear (exact ties do occur)."""
    r = tl.floor(x + 0.5)
    odd = r - 2.0 * tl.floor(r * 0.5)
    return tl.where(((r - x) == 0.5) & (odd != 0.0), r - 1.0, r)


@triton.jit
def _div(x, levels):
    return tl.div_rn(x, tl.zeros_like(x) + levels)


@triton.jit
def _quantize(x, scale):
    """x / scale (IEEE division: the approximate `/` moves values across rounding ties), rounded, int8."""
    return _round(tl.div_rn(x, scale)).to(tl.int8)


@triton.jit
def block_sparse_prepare(q_ptr, k_ptr, v_ptr, order_ptr, k_mean_ptr, qp_ptr, kp_ptr, vp_ptr, q_scale_ptr, k_scale_ptr,
                         v_scale_ptr, stride_b, stride_h, stride_n, heads, n_positions,
                         D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, QK_LEVELS: tl.constexpr,
                         PV_INT8: tl.constexpr, HAS_K_MEAN: tl.constexpr):
    """Program (position block, b·h): Q/K/V rows of one block of the head's order, laid out contiguously
    (`[b·h, positions, BLOCK_D]`), quantised once: Q and K per token at ±QK_LEVELS (K smoothed by the
    given token mean), V per channel over the block at ±127. Float modes copy the rows in order."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    h = bh % heads
    off = (bh // heads).to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    r = pid * BLOCK + tl.arange(0, BLOCK)
    tok = tl.load(order_ptr + h.to(tl.int64) * n_positions + r)
    ok = tok >= 0
    d = tl.arange(0, BLOCK_D)
    dst = bh.to(tl.int64) * n_positions * BLOCK_D + r[:, None].to(tl.int64) * BLOCK_D + d[None, :]
    q = _load_rows(q_ptr + off, tok, ok, stride_n, D, BLOCK_D).to(tl.float32)
    k = _load_rows(k_ptr + off, tok, ok, stride_n, D, BLOCK_D).to(tl.float32)
    v = _load_rows(v_ptr + off, tok, ok, stride_n, D, BLOCK_D)
    if HAS_K_MEAN:
        k_mean = tl.load(k_mean_ptr + bh.to(tl.int64) * D + d, mask=d < D, other=0.0)
        k = tl.where(ok[:, None] & (d[None, :] < D), k - k_mean[None, :], 0.0)
    if QK_LEVELS > 0:  # IEEE divisions throughout: fp16 inputs sit on a coarse grid where ties are common
        qs = tl.maximum(_div(tl.max(tl.abs(q), 1), QK_LEVELS), 1e-30)
        ks = tl.maximum(_div(tl.max(tl.abs(k), 1), QK_LEVELS), 1e-30)
        tl.store(qp_ptr + dst, _quantize(q, qs[:, None]))
        tl.store(kp_ptr + dst, _quantize(k, ks[:, None]))
        tl.store(q_scale_ptr + bh.to(tl.int64) * n_positions + r, qs)
        tl.store(k_scale_ptr + bh.to(tl.int64) * n_positions + r, ks)
    else:
        tl.store(qp_ptr + dst, q.to(qp_ptr.dtype.element_ty))
        tl.store(kp_ptr + dst, k.to(kp_ptr.dtype.element_ty))
    if PV_INT8:
        v32 = v.to(tl.float32)
        vs = tl.maximum(_div(tl.max(tl.abs(v32), 0), 127), 1e-30)
        tl.store(vp_ptr + dst, _quantize(v32, vs[None, :]))
        tl.store(v_scale_ptr + (bh.to(tl.int64) * (n_positions // BLOCK) + pid) * BLOCK_D + d, vs)
    else:
        tl.store(vp_ptr + dst, v)


@triton.jit
def block_sparse_attention(q_ptr, k_ptr, v_ptr, o_ptr, order_ptr, blocks_ptr, global_ptr, qp_ptr, kp_ptr, vp_ptr,
                           q_scale_ptr, k_scale_ptr, v_scale_ptr,
                           stride_b, stride_h, stride_n, heads, n_tokens, n_global, n_blocks, n_global_blocks, kept,
                           qk_scale,
                           D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, QK_LEVELS: tl.constexpr,
                           PV_INT8: tl.constexpr, PADDED: tl.constexpr):
    """Program (query block, b·h) over the prepared layout (`block_sparse_prepare`): positions are the
    head's order, `n_blocks` blocked ones followed by `n_global_blocks` blocks of global tokens. A query
    block attends to the global blocks and to its `kept` key blocks (`blocks[h, qb]`); the output rows go
    back to their tokens through `order`. Programs past `n_blocks` are the global queries' dense rows
    (float, over the original tensors). `PADDED=False` (every position holds a token) skips the masking."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    h = bh % heads
    off = (bh // heads).to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    o_base = o_ptr + off
    r = tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    acc = tl.full([BLOCK, BLOCK_D], 0.0, tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK], 0.0, tl.float32)
    if pid >= n_blocks:
        g = (pid - n_blocks) * BLOCK + r
        g_ok = g < n_global
        tok = tl.load(global_ptr + g, mask=g_ok, other=0)
        q_global = _load_rows(q_ptr + off, tok, g_ok, stride_n, D, BLOCK_D)
        acc, m_i, l_i = _attend_range(q_global, acc, m_i, l_i, k_ptr + off, v_ptr + off, 0, n_tokens, stride_n,
                                      qk_scale, D, BLOCK, BLOCK_D)
        _store_rows(o_base, tok, g_ok, acc, l_i, stride_n, D, BLOCK_D)
    else:
        n_positions = (n_blocks + n_global_blocks) * BLOCK
        layout = bh.to(tl.int64) * n_positions * BLOCK_D
        rows = layout + (pid * BLOCK + r)[:, None].to(tl.int64) * BLOCK_D + d[None, :]
        q = tl.load(qp_ptr + rows)
        if QK_LEVELS > 0:
            q_scale = tl.load(q_scale_ptr + bh.to(tl.int64) * n_positions + pid * BLOCK + r) * qk_scale
        table = blocks_ptr + (h.to(tl.int64) * n_blocks + pid) * kept
        for i in range(0, n_global_blocks + kept):
            kb = n_blocks + i
            if i >= n_global_blocks:
                kb = tl.load(table + i - n_global_blocks)
            pos = kb * BLOCK + r
            kv_rows = layout + pos[:, None].to(tl.int64) * BLOCK_D + d[None, :]
            k = tl.load(kp_ptr + kv_rows)
            v = tl.load(vp_ptr + kv_rows)
            if QK_LEVELS > 0:
                k_scale = tl.load(k_scale_ptr + bh.to(tl.int64) * n_positions + pos)
                s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * q_scale[:, None] * k_scale[None, :]
            else:
                s = _logits(q, k, qk_scale)
            if PADDED:  # the last blocked block or a global block has empty slots
                valid = tl.load(order_ptr + h.to(tl.int64) * n_positions + pos) >= 0
                s = tl.where(valid[None, :], s, float("-inf"))
            if PV_INT8:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v_scale = tl.load(v_scale_ptr + (bh.to(tl.int64) * (n_positions // BLOCK) + kb) * BLOCK_D + d)
                pv = tl.dot((p * 127.0 + 0.5).to(tl.int8), v, out_dtype=tl.int32).to(tl.float32)
                acc = acc * alpha[:, None] + pv * (v_scale[None, :] / 127.0)
                m_i = m_new
            else:
                acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v)
        q_tok = tl.load(order_ptr + h.to(tl.int64) * n_positions + pid * BLOCK + r)
        _store_rows(o_base, q_tok, q_tok >= 0, acc, l_i, stride_n, D, BLOCK_D)
