"""ONNX subgraphs for the spatial variants: tiles of queries, gathered key regions, batched MatMuls.

One computation serves every variant (`emit_tiled`), driven by the static tables of
`spatial_tables.py`:

    Qt = scale·Gather(Q, query tiles)            [B, h, T, Tq, d]
    Kt, Vt = Gather(K|V, key regions)            [B, h, T, R, d]   (prefix keys = first columns)
    S = Qt · Ktᵀ + mask (+ bias, gathered)       [B, h, T, Tq, R]  mask carves each query's exact set
    O = Gather(Softmax(S) · Vt, inverse)         [B, h, N, dv]     back in token order

Prefix queries keep dense attention and are concatenated in front. Nothing depends on the batch
size (Reshape copies dims with 0), so a symbolic batch dim stays symbolic. Masks use a dtype-aware
large negative, biases are clamped so no row is ever fully masked (see `spatial_tables`), and
HaloNet's zero keys are one sentinel zero row appended to K and V whose logit gets log(count).
Large tables become initializers named by content, so all sites with the same geometry share one.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes.ops import reduce
from attnrewrite.passes.spatial import reference as R
from attnrewrite.passes.spatial.tables import (  # noqa: F401  (re-exported for passes/benchmarks)
    AxisRule, TileTables, bias_floor, build_tables, masked_value, rules_grid, rules_halo, rules_neighborhood,
    rules_window, window_axis,
)
from attnrewrite.passes.spatial import tables as S

#: Tables at least this many elements become shared, content-named initializers.
_SHARED_MIN_SIZE = 256


def _const(t: ir_tape.Tape, array: np.ndarray) -> ir.Value:
    array = np.ascontiguousarray(array)
    graph = t.graph_like
    if array.size < _SHARED_MIN_SIZE or not isinstance(graph, ir.Graph):
        return t.op("Constant", [], attributes={"value": ir.tensor(array)})
    digest = hashlib.sha1(array.tobytes() + str((array.dtype.str, array.shape)).encode()).hexdigest()[:16]
    name = f"attnrewrite_spatial_{digest}"
    existing = graph.initializers.get(name)
    if existing is not None:
        return existing
    return t.initializer(ir.tensor(array, name=name), name=name)


def _ints(t, values) -> ir.Value:
    return _const(t, np.asarray(values, np.int64))


def _static(value: ir.Value, axis: int) -> int:
    dim = value.shape[axis] if value.shape is not None and len(value.shape) > axis else None
    if not isinstance(dim, int):
        raise ValueError(f"axis {axis} of {value.name} must be static for a spatial rewrite (shape {value.shape})")
    return dim


def _dtype(value: ir.Value):
    if value.dtype is None:
        raise ValueError(f"{value.name} has no element type")
    return value.dtype.numpy()


def _slice(t, x, start: int, end: int, axis: int) -> ir.Value:
    return t.op("Slice", [x, _ints(t, [start]), _ints(t, [end]), _ints(t, [axis])])


def _gather_tokens(t, x: ir.Value, index: np.ndarray, tokens: int, d: int) -> ir.Value:
    """x [B, h, tokens, d] at `index` [T, S] → [B, h, T, S, d]; a plain Reshape when index is 0..tokens-1."""
    shape = _ints(t, [0, 0, index.shape[0], index.shape[1], d])
    if index.size == tokens and np.array_equal(index.reshape(-1), np.arange(index.size)):
        return t.op("Reshape", [x, shape])
    flat = t.op("Gather", [x, _const(t, index.reshape(-1).astype(np.int64))], attributes={"axis": 2})
    return t.op("Reshape", [flat, shape])


def _dense(t, qs, k, v, bias_rows) -> ir.Value:
    """softmax(qs·kᵀ + bias)·v for the prefix queries (qs already scaled)."""
    logits = t.op("MatMul", [qs, t.op("Transpose", [k], attributes={"perm": [0, 1, 3, 2]})])
    if bias_rows is not None:
        logits = t.op("Add", [logits, bias_rows])
    return t.op("MatMul", [t.op("Softmax", [logits], attributes={"axis": -1}), v])


# --- bias ---------------------------------------------------------------------------------------


def _bias_axes(bias: ir.Value, n_total: int) -> tuple[int, bool, bool]:
    """(rank, rows are per query, columns are per key) of a bias broadcastable to [B, h, n, n]."""
    if bias.shape is None or not 1 <= len(bias.shape) <= 4:
        raise ValueError(f"bias {bias.name} must have a known rank <= 4, got shape {bias.shape}")
    rank = len(bias.shape)
    dims = [1] * (4 - rank) + list(bias.shape)
    for dim in dims[2:]:
        if isinstance(dim, int) and dim not in (1, n_total):
            raise ValueError(f"bias {bias.name} shape {bias.shape}: last two dims must be 1 or {n_total}")
    return rank, dims[2] != 1, dims[3] != 1


def _tile_bias(t, bias: ir.Value, row_table: np.ndarray, key_table: np.ndarray, n_total: int, sentinel: bool,
               dtype) -> tuple[ir.Value | None, np.ndarray | None]:
    """The bias at each tile's (query, key) slots, clamped to `bias_floor`: [B|1, h|1, T, Tq|1, R|1].

    Returns (dynamic value, None) or (None, constant array) for a constant bias. The sentinel zero
    key (column `n_total`) has bias 0: it is not a token of the site.
    """
    rank, rows_full, cols_full = _bias_axes(bias, n_total)
    cols_full = cols_full or sentinel  # the sentinel needs its own column
    width = n_total + 1 if sentinel else (n_total if cols_full else 1)
    rows = row_table if rows_full else np.zeros((row_table.shape[0], 1), np.int64)
    cols = key_table if cols_full else np.zeros((key_table.shape[0], 1), np.int64)
    flat_index = rows[:, :, None] * width + cols[:, None, :]
    floor = bias_floor(dtype)
    if bias.const_value is not None:
        arr = bias.const_value.numpy().reshape([1] * (4 - rank) + list(bias.const_value.shape))
        arr = np.broadcast_to(arr, arr.shape[:2] + (arr.shape[2], n_total if cols_full else 1))
        if sentinel:
            arr = np.concatenate([arr, np.zeros(arr.shape[:3] + (1,), arr.dtype)], axis=3)
        flat = arr.reshape(arr.shape[0], arr.shape[1], -1)
        return None, np.maximum(np.take(flat, flat_index, axis=2), floor)
    b = bias
    if rank < 4:
        b = t.op("Unsqueeze", [b, _ints(t, list(range(4 - rank)))])
    if sentinel:
        b = t.op("Expand", [b, _ints(t, [1, 1, 1, n_total])])
        b = t.op("Pad", [b, _ints(t, [0, 0, 0, 0, 0, 0, 0, 1])])
    flat = t.op("Reshape", [b, _ints(t, [0, 0, -1])])
    gathered = t.op("Gather", [flat, _const(t, flat_index.reshape(-1))], attributes={"axis": 2})
    gathered = t.op("Reshape", [gathered, _ints(t, [0, 0, *flat_index.shape])])
    return t.op("Max", [gathered, _const(t, np.array(floor, dtype))]), None


# --- the shared computation ---------------------------------------------------------------------


def emit_tiled(
    t: ir_tape.Tape, q: ir.Value, k: ir.Value, v: ir.Value, *, scale: float, bias: ir.Value | None,
    grid: tuple[int, int], prefix: int, rule_y: AxisRule, rule_x: AxisRule, prefix_mode: str = "global",
) -> ir.Value:
    """Attention of `[B, h, P+N, d]` Q/K/V restricted by the per-axis rules; returns `[B, h, P+N, dv]`."""
    if prefix_mode not in R.PREFIX_MODES:
        raise ValueError(f"{prefix_mode=} must be one of {R.PREFIX_MODES}")
    d, dv = _static(q, 3), _static(v, 3)
    n_total = prefix + grid[0] * grid[1]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if _static(x, 2) != n_total:
            raise ValueError(f"{name} has {_static(x, 2)} tokens, expected {prefix=} + grid {grid[0]}x{grid[1]} = {n_total}")
    dtype = _dtype(q)
    tables = build_tables(grid, rule_y, rule_x)
    n_tiles, tq = tables.query_index.shape
    global_prefix = prefix > 0 and prefix_mode == "global"
    sentinel = tables.zero_keys is not None
    key_table, additive = _key_slots(tables, prefix, global_prefix, n_total, dtype)

    scale_c = _const(t, np.array(scale, dtype))
    keys, values = k, v
    if sentinel:
        pad = _ints(t, [0, 0, 0, 0, 0, 0, 1, 0])
        keys, values = t.op("Pad", [k, pad]), t.op("Pad", [v, pad])
    n_keys = n_total + sentinel
    # scale right before the MatMul: ORT folds Mul-by-scalar + MatMul + Transpose into one FusedMatMul
    q_tiles = t.op("Mul", [_gather_tokens(t, q, tables.query_index + prefix, n_total, d), scale_c])
    k_tiles = _gather_tokens(t, keys, key_table, n_keys, d)
    v_tiles = _gather_tokens(t, values, key_table, n_keys, dv)
    logits = _tile_logits(t, q_tiles, k_tiles, bias, tables, key_table, additive, prefix, n_total, sentinel, dtype)
    out = t.op("MatMul", [t.op("Softmax", [logits], attributes={"axis": -1}), v_tiles])
    grid_out = _untile(t, out, tables, grid, dv)
    if not prefix:
        return _typed(grid_out, q, n_total, dv)
    prefix_out = _prefix_queries(t, q, k, v, bias, scale_c, prefix, global_prefix, n_total)
    return _typed(t.op("Concat", [prefix_out, grid_out], attributes={"axis": 2}), q, n_total, dv)


def _key_slots(tables: TileTables, prefix: int, global_prefix: bool, n_total: int, dtype
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Each tile's key slots [T, R'] — [prefix keys] + region keys + [sentinel zero key] — and the
    additive mask over the same slots [T, Tq, R'] (prefix: 0; region: 0 or masked; sentinel:
    log(zero keys), so exp(0 + log c) = c zero keys), None when every slot is allowed."""
    n_tiles, tq = tables.query_index.shape
    sentinel = tables.zero_keys is not None
    n_prefix_keys = prefix if global_prefix else 0
    key_cols = [np.broadcast_to(np.arange(n_prefix_keys), (n_tiles, n_prefix_keys)), tables.key_index + prefix]
    additive = None
    if tables.allowed is not None or sentinel:
        region = 0.0 if tables.allowed is None else np.where(tables.allowed, 0.0, masked_value(dtype))
        mask_cols = [np.zeros((n_tiles, tq, n_prefix_keys)),
                     np.broadcast_to(region, (n_tiles, tq, tables.key_index.shape[1]))]
        if sentinel:
            counts = tables.zero_keys[:, :, None]
            mask_cols.append(np.where(counts > 0, np.log(np.maximum(counts, 1)), masked_value(dtype)))
        additive = np.concatenate(mask_cols, axis=2)
    if sentinel:
        key_cols.append(np.full((n_tiles, 1), n_total))
    return np.concatenate(key_cols, axis=1).astype(np.int64), additive


def _tile_logits(t, q_tiles, k_tiles, bias, tables, key_table, additive, prefix, n_total, sentinel, dtype) -> ir.Value:
    """scale·Q·Kᵀ per tile plus the carving mask and the (gathered) bias: [B, h, T, Tq, R']."""
    logits = t.op("MatMul", [q_tiles, t.op("Transpose", [k_tiles], attributes={"perm": [0, 1, 2, 4, 3]})])
    dynamic_bias = None
    if bias is not None:
        dynamic_bias, const_bias = _tile_bias(t, bias, tables.query_index + prefix, key_table, n_total, sentinel, dtype)
        if const_bias is not None:
            additive = const_bias if additive is None else const_bias + additive
    if additive is not None:
        logits = t.op("Add", [logits, _const(t, additive.astype(dtype))])
    if dynamic_bias is not None:
        logits = t.op("Add", [logits, dynamic_bias])
    return logits


def _untile(t, out: ir.Value, tables: TileTables, grid, dv: int) -> ir.Value:
    """[B, h, T, Tq, dv] tile outputs back to grid token order [B, h, N, dv]."""
    n_tiles, tq = tables.query_index.shape
    flat = t.op("Reshape", [out, _ints(t, [0, 0, n_tiles * tq, dv])])
    if n_tiles * tq == grid[0] * grid[1] and np.array_equal(tables.inverse, np.arange(tables.inverse.size)):
        return flat
    return t.op("Gather", [flat, _const(t, tables.inverse)], attributes={"axis": 2})


def _prefix_queries(t, q, k, v, bias, scale_c, prefix: int, global_prefix: bool, n_total: int) -> ir.Value:
    """Dense softmax attention of the prefix queries: over every key (global) or the prefix keys."""
    qp = t.op("Mul", [_slice(t, q, 0, prefix, 2), scale_c])
    rank, rows_full, cols_full = _bias_axes(bias, n_total) if bias is not None else (4, False, False)
    bias_rows = _slice(t, bias, 0, prefix, rank - 2) if bias is not None and rows_full else bias
    if global_prefix:
        return _dense(t, qp, k, v, bias_rows)
    if bias_rows is not None and cols_full:
        bias_rows = _slice(t, bias_rows, 0, prefix, rank - 1)
    return _dense(t, qp, _slice(t, k, 0, prefix, 2), _slice(t, v, 0, prefix, 2), bias_rows)


def emit_hybrid_tiled(
    t: ir_tape.Tape, q: ir.Value, k: ir.Value, v: ir.Value, fq: ir.Value, fk: ir.Value, gamma: np.ndarray, *,
    scale: float, bias: ir.Value | None, grid: tuple[int, int], prefix: int, rule_y: AxisRule, rule_x: AxisRule,
) -> ir.Value:
    """LoLCATs' window + linear attention (ALGORITHMS.md §6, `linear_hybrid.hybrid_reference`):

        a_ij = γ_h·exp(s_ij − max_local s_i)  for j in query i's local set (the rules, prefix keys global)
               (1 − γ_h)·φ(q_i)·φ(k_j)         for every other key
        O_i  = Σ_j a_ij v_j / Σ_j a_ij

    The outside-local linear sums are the global ones (φ(K)ᵀV and Σφ(K), once per site) minus the
    local ones gathered on the same tiles, so the cost stays linear in tokens. `fk` carries the key
    weights of a padding bias already; prefix queries attend exactly to every key. When the local sets
    cover every key the outside sums are zero by construction and are not emitted (computed, they
    would only add the float rounding of global − local).
    """
    d, dv, features = _static(q, 3), _static(v, 3), _static(fq, 3)
    n_total = prefix + grid[0] * grid[1]
    dtype = _dtype(q)
    tables = build_tables(grid, rule_y, rule_x)
    if tables.zero_keys is not None:
        raise ValueError("zero-padded key regions (halo border=zero) have no linear counterpart")
    key_table, additive = _key_slots(tables, prefix, prefix > 0, n_total, dtype)
    inside = np.ones(tables.query_index.shape + key_table.shape[1:], dtype) if additive is None else \
        (additive == 0).astype(dtype)  # [T, Tq, R'] 1 on the local set

    scale_c = _const(t, np.array(scale, dtype))
    query_rows = tables.query_index + prefix
    q_tiles = t.op("Mul", [_gather_tokens(t, q, query_rows, n_total, d), scale_c])
    k_tiles = _gather_tokens(t, k, key_table, n_total, d)
    v_tiles = _gather_tokens(t, v, key_table, n_total, dv)
    logits = _tile_logits(t, q_tiles, k_tiles, bias, tables, key_table, additive, prefix, n_total, False, dtype)
    graph = t.graph_like
    local = t.op("Exp", [t.op("Sub", [logits, reduce(t, graph, "ReduceMax", logits, [-1])])])
    local_num = t.op("MatMul", [local, v_tiles])  # [B, h, T, Tq, dv]
    local_den = reduce(t, graph, "ReduceSum", local, [-1])

    g = _const(t, np.asarray(gamma, dtype).reshape(1, -1, 1, 1, 1))
    if R.combine(grid, prefix, rule_y.mask, rule_x.mask).all():
        grid_out = _untile(t, t.op("Div", [local_num, local_den]), tables, grid, dv)
        return _with_prefix_queries(t, grid_out, q, k, v, bias, scale_c, prefix, n_total, dv)
    fq_tiles = _gather_tokens(t, fq, query_rows, n_total, features)
    fk_tiles = _gather_tokens(t, fk, key_table, n_total, features)
    near = t.op("Mul", [t.op("MatMul", [fq_tiles, t.op("Transpose", [fk_tiles], attributes={"perm": [0, 1, 2, 4, 3]})]),
                        _const(t, inside)])  # linear weights on the local set, which softmax covers instead
    kv = t.op("MatMul", [t.op("Transpose", [fk], attributes={"perm": [0, 1, 3, 2]}), v])  # [B, h, F, dv]
    z = reduce(t, graph, "ReduceSum", fk, [2])  # [B, h, 1, F]
    unsqueeze = lambda x: t.op("Unsqueeze", [x, _ints(t, [2])])  # noqa: E731  [B, h, 1, ·, ·] over tiles
    far_num = t.op("Sub", [t.op("MatMul", [fq_tiles, unsqueeze(kv)]), t.op("MatMul", [near, v_tiles])])
    far_den = t.op("Sub", [t.op("MatMul", [fq_tiles, unsqueeze(t.op("Transpose", [z], attributes={"perm": [0, 1, 3, 2]}))]),
                           reduce(t, graph, "ReduceSum", near, [-1])])
    g_far = _const(t, (1 - np.asarray(gamma, dtype)).reshape(1, -1, 1, 1, 1))
    num = t.op("Add", [t.op("Mul", [local_num, g]), t.op("Mul", [far_num, g_far])])
    den = t.op("Add", [t.op("Mul", [local_den, g]), t.op("Mul", [far_den, g_far])])
    grid_out = _untile(t, t.op("Div", [num, den]), tables, grid, dv)
    return _with_prefix_queries(t, grid_out, q, k, v, bias, scale_c, prefix, n_total, dv)


def _with_prefix_queries(t, grid_out, q, k, v, bias, scale_c, prefix: int, n_total: int, dv: int) -> ir.Value:
    """[exact prefix queries over every key, grid outputs] as `[B, h, P+N, dv]`."""
    if not prefix:
        return _typed(grid_out, q, n_total, dv)
    prefix_out = _prefix_queries(t, q, k, v, bias, scale_c, prefix, True, n_total)
    return _typed(t.op("Concat", [prefix_out, grid_out], attributes={"axis": 2}), q, n_total, dv)


def _typed(out: ir.Value, q: ir.Value, n_total: int, dv: int) -> ir.Value:
    """The result has Q's element type and shape [B, h, P+N, dv] (B as Q has it, possibly symbolic)."""
    out.type = q.type
    out.shape = ir.Shape([q.shape[0], q.shape[1], n_total, dv])
    return out


# --- the variants -------------------------------------------------------------------------------


def emit_window(t, q, k, v, *, scale, bias, grid, prefix, size, shift=None, prefix_mode="global") -> ir.Value:
    """Swin W-MSA (shift 0) / SW-MSA (cut-point form); partial windows at the ends (pad + mask).
    A 3-D grid (F, H, W) takes 3-D `size` and `shift` (Video Swin)."""
    shift = (0,) * len(grid) if shift is None else shift
    if len(grid) == 3:  # F×H×W is the 2-D grid (F·H)×W with merged axis rules
        ry, rx = S.rules_window_3d(grid, size, shift)
        grid = (grid[0] * grid[1], grid[2])
    else:
        ry, rx = rules_window(grid, size, shift)
    return emit_tiled(t, q, k, v, scale=scale, bias=bias, grid=grid, prefix=prefix, rule_y=ry, rule_x=rx,
                      prefix_mode=prefix_mode)


def emit_neighborhood(t, q, k, v, *, scale, bias, grid, prefix, kernel, dilation=None, prefix_mode="global",
                      tile=None, stride=(1, 1)) -> ir.Value:
    """NATTEN neighbourhood (clamped), DiNA with `dilation`, GNA with `stride`; `tile=None` = cost model."""
    dilation = (1,) * len(grid) if dilation is None else dilation
    if len(grid) == 3:
        if stride != (1, 1):
            raise ValueError("strided neighbourhoods are 2-D only")
        ry, rx = S.rules_neighborhood_3d(grid, kernel, dilation, tile)
        grid = (grid[0] * grid[1], grid[2])
    else:
        ry, rx = rules_neighborhood(grid, kernel, dilation, tile, stride)
    return emit_tiled(t, q, k, v, scale=scale, bias=bias, grid=grid, prefix=prefix, rule_y=ry, rule_x=rx,
                      prefix_mode=prefix_mode)


def emit_grid(t, q, k, v, *, scale, bias, grid, prefix, size, prefix_mode="global") -> ir.Value:
    """MaxViT grid attention: groups of `size` tokens strided by ⌈side/size⌉ across the grid."""
    ry, rx = rules_grid(grid, size)
    return emit_tiled(t, q, k, v, scale=scale, bias=bias, grid=grid, prefix=prefix, rule_y=ry, rule_x=rx,
                      prefix_mode=prefix_mode)


def emit_halo(t, q, k, v, *, scale, bias, grid, prefix, block, halo, border="mask", prefix_mode="global") -> ir.Value:
    """HaloNet: b×b query blocks over their (b+2h)² windows; `border="zero"` = timm's zero-padded keys."""
    ry, rx = rules_halo(grid, block, halo, border)
    return emit_tiled(t, q, k, v, scale=scale, bias=bias, grid=grid, prefix=prefix, rule_y=ry, rule_x=rx,
                      prefix_mode=prefix_mode)


def emit_sliding_1d(t, q, k, v, *, scale, bias, window: int, mode: str = "centered", prefix: int = 0,
                    prefix_mode: str = "global", tile: int | None = None, dilation: int = 1,
                    bias_per_key: bool = False) -> ir.Value:
    """Text: every token after the P prefix tokens sees `window` keys in total (`centered`, NATTEN
    1-D, clamped at the ends, every `dilation`-th token for DiNA) or its block of `window` tokens
    (`block`); a key-padding bias [B,1,1,T] is honoured. A window longer than the sequence is full
    attention. A symbolic sequence length takes `spatial_dynamic` (no dilation there)."""
    if not isinstance(q.shape[2] if q.shape is not None and len(q.shape) == 4 else None, int):
        from attnrewrite.passes.spatial.dynamic import emit_sliding_1d_dynamic

        if dilation != 1:
            raise ValueError("dilation needs a static sequence length")
        return emit_sliding_1d_dynamic(t, q, k, v, scale=scale, bias=bias, window=window, mode=mode, prefix=prefix,
                                       prefix_mode=prefix_mode, bias_per_key=bias_per_key)
    length = _static(q, 2) - prefix
    if window < 1 or dilation < 1:
        raise ValueError(f"{window=} and {dilation=} must be >= 1")
    window = min(window, length // dilation)
    if mode == "centered":
        rule = S.neighborhood_axis(length, window, dilation, tile)
    elif mode == "block" and dilation == 1:
        rule = window_axis(length, window)
    else:
        raise ValueError(f"{mode=} must be centered, or block without dilation")
    return emit_tiled(t, q, k, v, scale=scale, bias=bias, grid=(1, length), prefix=prefix,
                      rule_y=window_axis(1, 1), rule_x=rule, prefix_mode=prefix_mode)
