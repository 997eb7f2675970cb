"""ONNX subgraphs for the spatial variants: tiles of queries, gathered key regions, batched MatMuls.

All variants share one shape of computation. Grid queries are grouped into tiles (a window, a MaxViT
grid group, a HaloNet block, or a t×t patch of neighbourhood queries). Each tile gathers the union
of its queries' keys once, with a static index table, so the work is one batched MatMul
`[B, h, tiles, Tq, d] × [B, h, tiles, d, R]`; a static additive mask carves each query's exact key
set out of the region where they differ. Outputs are put back in token order with one inverse
Gather. Prefix tokens keep dense attention. The tables come from the per-axis rules of
`spatial_reference.py`, so the math is defined in one place.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes import spatial_reference as R

#: Large negative for masked logits: finite (no inf − inf = NaN), far below any real logit.
MASKED = np.float32(np.finfo(np.float32).min / 4)


@dataclasses.dataclass
class TileTables:
    """Static tables for one tiling of the grid (indices are grid positions, prefix excluded)."""

    query_index: np.ndarray  # [T, Tq] grid position of each tile slot (pads repeat a real query)
    key_index: np.ndarray  # [T, R]  grid position of each key slot (pads point at 0, masked)
    mask: np.ndarray | None  # [T, Tq, R] additive; None when every slot is a real, allowed key
    inverse: np.ndarray  # [N] flat slot (tile·Tq + slot) holding each grid query
    zero_keys: np.ndarray | None  # [T, Tq] zero-padded keys per query (halo border="zero")

    @property
    def useful_fraction(self) -> float:
        """Allowed (query, key) pairs over computed pairs: the FLOP efficiency of this tiling."""
        computed = self.query_index.size * self.key_index.shape[1]
        if self.mask is None:
            return 1.0
        return float(np.sum(self.mask == 0) / computed)


def build_tables(grid: tuple[int, int], rule_y: R.AxisRule, rule_x: R.AxisRule) -> TileTables:
    h, w = grid
    tiles = []
    for ty, tx in itertools.product(rule_y.tiles, rule_x.tiles):
        queries = [y * w + x for y in ty for x in tx]
        ky = sorted({k for y in ty for k in rule_y.keys[y]})
        kx = sorted({k for x in tx for k in rule_x.keys[x]})
        keys = [y * w + x for y in ky for x in kx]
        tiles.append((ty, tx, queries, ky, kx, keys))
    tq = max(len(t[2]) for t in tiles)
    r = max(len(t[5]) for t in tiles)
    n_tiles = len(tiles)
    query_index = np.zeros((n_tiles, tq), np.int64)
    key_index = np.zeros((n_tiles, r), np.int64)
    mask = np.full((n_tiles, tq, r), MASKED, np.float32)
    zeros = np.zeros((n_tiles, tq), np.int64)
    inverse = np.full(h * w, -1, np.int64)
    for t, (ty, tx, queries, ky, kx, keys) in enumerate(tiles):
        query_index[t, : len(queries)] = queries
        query_index[t, len(queries):] = queries[0]
        key_index[t, : len(keys)] = keys
        pos_y = {y: i for i, y in enumerate(ky)}
        pos_x = {x: i for i, x in enumerate(kx)}
        for slot, (y, x) in enumerate((y, x) for y in ty for x in tx):
            inverse[y * w + x] = t * tq + slot
            allowed_y = np.zeros(len(ky), bool)
            allowed_y[[pos_y[k] for k in rule_y.keys[y]]] = True
            allowed_x = np.zeros(len(kx), bool)
            allowed_x[[pos_x[k] for k in rule_x.keys[x]]] = True
            ok = np.outer(allowed_y, allowed_x).reshape(-1)
            mask[t, slot, : len(keys)] = np.where(ok, 0.0, MASKED)
            if rule_y.zeros is not None or rule_x.zeros is not None:
                ny = len(rule_y.keys[y]) + (rule_y.zeros[y] if rule_y.zeros else 0)
                nx = len(rule_x.keys[x]) + (rule_x.zeros[x] if rule_x.zeros else 0)
                zeros[t, slot] = ny * nx - len(rule_y.keys[y]) * len(rule_x.keys[x])
        for slot in range(len(queries), tq):  # pad queries: keep a harmless finite row
            mask[t, slot] = mask[t, 0]
    assert np.all(inverse >= 0), "every grid query must belong to a tile"
    has_zeros = bool(np.any(zeros))
    return TileTables(
        query_index=query_index, key_index=key_index,
        mask=None if np.all(mask == 0) else mask, inverse=inverse,
        zero_keys=zeros if has_zeros else None,
    )


# --- ONNX emission ------------------------------------------------------------------------------


def _c(t: ir_tape.Tape, array, dtype=None) -> ir.Value:
    arr = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
    return t.op("Constant", [], attributes={"value": ir.tensor(arr)})


def _static(value: ir.Value, axis: int) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise ValueError(f"axis {axis} of {value.name} must be static for a spatial rewrite")
    return dim


def _gather_tokens(t, x: ir.Value, index: np.ndarray, d: int) -> ir.Value:
    """x [B, h, N, d] gathered at `index` [T, S] → [B, h, T, S, d]."""
    flat = t.op("Gather", [x, _c(t, index.reshape(-1), np.int64)], attributes={"axis": 2})
    return t.op("Reshape", [flat, _c(t, [0, 0, index.shape[0], index.shape[1], d], np.int64)])


def _dense(t, q, k, v, scale, bias_rows) -> ir.Value:
    kt = t.op("Transpose", [k], attributes={"perm": [0, 1, 3, 2]})
    logits = t.op("MatMul", [t.op("Mul", [q, _c(t, scale, np.float32)]), kt])
    if bias_rows is not None:
        logits = t.op("Add", [logits, bias_rows])
    return t.op("MatMul", [t.op("Softmax", [logits], attributes={"axis": -1}), v])


def _slice(t, x, start: int, end: int, axis: int) -> ir.Value:
    return t.op("Slice", [x, _c(t, [start], np.int64), _c(t, [end], np.int64), _c(t, [axis], np.int64)])


def _tile_bias(t, bias: ir.Value, tables: TileTables, prefix: int, n_total: int, with_prefix_keys: bool):
    """The site's bias at each tile's (query, key) slots: [B|1, h|1, T, Tq|1, Kslots|1]."""
    rank = len(bias.shape)
    rows_full = bias.shape[rank - 2] != 1
    cols_full = bias.shape[rank - 1] != 1
    q_rows = tables.query_index + prefix if rows_full else np.zeros((tables.query_index.shape[0], 1), np.int64)
    key_cols = tables.key_index + prefix
    if with_prefix_keys:
        key_cols = np.concatenate([np.broadcast_to(np.arange(prefix), (key_cols.shape[0], prefix)), key_cols], 1)
    if not cols_full:
        key_cols = np.zeros((key_cols.shape[0], 1), np.int64)
    width = n_total if cols_full else 1
    flat_index = q_rows[:, :, None] * width + key_cols[:, None, :]  # [T, Tq|1, K|1]
    if bias.const_value is not None:
        arr = bias.const_value.numpy()
        while arr.ndim < 4:
            arr = arr[None]
        flat = arr.reshape(arr.shape[0], arr.shape[1], -1)
        return _c(t, np.take(flat, flat_index, axis=2).astype(np.float32))
    b = bias
    if rank < 4:
        b = t.op("Unsqueeze", [b, _c(t, list(range(4 - rank)), np.int64)])
    flat = t.op("Reshape", [b, _c(t, [0, 0, -1], np.int64)])
    gathered = t.op("Gather", [flat, _c(t, flat_index.reshape(-1), np.int64)], attributes={"axis": 2})
    return t.op("Reshape", [gathered, _c(t, [0, 0, *flat_index.shape], np.int64)])


def emit_tiled(
    t: ir_tape.Tape, q: ir.Value, k: ir.Value, v: ir.Value, *, scale: float, bias: ir.Value | None,
    grid: tuple[int, int], prefix: int, rule_y: R.AxisRule, rule_x: R.AxisRule, prefix_mode: str = "global",
) -> ir.Value:
    """Sparse attention of `[B, h, P+N, d]` Q/K/V under the per-axis rules; returns `[B, h, P+N, dv]`."""
    d, dv = _static(q, 3), _static(v, 3)
    n_total = prefix + grid[0] * grid[1]
    if _static(q, 2) != n_total or _static(k, 2) != n_total:
        raise ValueError(f"grid {grid} + {prefix} prefix tokens != {_static(q, 2)} tokens")
    tables = build_tables(grid, rule_y, rule_x)
    if tables.zero_keys is not None and bias is not None:
        raise ValueError("zero-padded halo keys with a bias are not supported")
    global_prefix = prefix > 0 and prefix_mode == "global"
    # Gather straight from the full token axis: prefix keys (one softmax over prefix ∪ local keys)
    # are just the first columns of every tile's key table, so no Slice/Expand/Concat copies.
    key_table = tables.key_index + prefix
    if global_prefix:
        key_table = np.concatenate([np.broadcast_to(np.arange(prefix), (key_table.shape[0], prefix)), key_table], 1)
    q_tiles = _gather_tokens(t, q, tables.query_index + prefix, d)
    k_tiles = _gather_tokens(t, k, key_table, d)
    v_tiles = _gather_tokens(t, v, key_table, dv)
    mask = tables.mask
    if global_prefix and mask is not None:
        mask = np.concatenate([np.zeros(mask.shape[:2] + (prefix,), np.float32), mask], axis=2)
    if tables.zero_keys is not None:
        # each zero key adds exp(0 − max) to the denominator: model them as one extra key with
        # logit log(count) (count 0 → masked) and a zero value
        n_tiles, tq = tables.zero_keys.shape
        extra = np.where(tables.zero_keys > 0, np.log(np.maximum(tables.zero_keys, 1)), MASKED).astype(np.float32)
        base = mask if mask is not None else np.zeros((n_tiles, tq, key_table.shape[1]), np.float32)
        mask = np.concatenate([base, extra[:, :, None]], axis=2)
        zk = t.op("Mul", [_slice(t, k_tiles, 0, 1, 3), _c(t, 0.0, np.float32)])
        zv = t.op("Mul", [_slice(t, v_tiles, 0, 1, 3), _c(t, 0.0, np.float32)])
        k_tiles = t.op("Concat", [k_tiles, zk], attributes={"axis": 3})
        v_tiles = t.op("Concat", [v_tiles, zv], attributes={"axis": 3})
    logits = t.op("MatMul", [t.op("Mul", [q_tiles, _c(t, scale, np.float32)]),
                             t.op("Transpose", [k_tiles], attributes={"perm": [0, 1, 2, 4, 3]})])
    if mask is not None:
        logits = t.op("Add", [logits, _c(t, mask)])
    if bias is not None:
        logits = t.op("Add", [logits, _tile_bias(t, bias, tables, prefix, n_total, global_prefix)])
    out = t.op("MatMul", [t.op("Softmax", [logits], attributes={"axis": -1}), v_tiles])
    flat = t.op("Reshape", [out, _c(t, [0, 0, -1, dv], np.int64)])
    grid_out = t.op("Gather", [flat, _c(t, tables.inverse, np.int64)], attributes={"axis": 2})
    if not prefix:
        return grid_out
    qp = _slice(t, q, 0, prefix, 2)
    bias_rows = _slice(t, bias, 0, prefix, len(bias.shape) - 2) if bias is not None and bias.shape[-2] != 1 else bias
    if prefix_mode == "global":
        prefix_out = _dense(t, qp, k, v, scale, bias_rows)
    else:
        kp, vp = _slice(t, k, 0, prefix, 2), _slice(t, v, 0, prefix, 2)
        if bias_rows is not None:
            bias_rows = _slice(t, bias_rows, 0, prefix, len(bias.shape) - 1) if bias.shape[-1] != 1 else bias_rows
        prefix_out = _dense(t, qp, kp, vp, scale, bias_rows)
    return t.op("Concat", [prefix_out, grid_out], attributes={"axis": 2})


# --- the variants -------------------------------------------------------------------------------


def rules_window(grid, size, shift=(0, 0)):
    return R.window_axis(grid[0], size[0], shift[0]), R.window_axis(grid[1], size[1], shift[1])


def rules_neighborhood(grid, kernel, dilation=(1, 1), tile=None):
    tile = tile or (None, None)
    return (R.neighborhood_axis(grid[0], kernel[0], dilation[0], tile[0]),
            R.neighborhood_axis(grid[1], kernel[1], dilation[1], tile[1]))


def rules_grid(grid, size):
    return R.grid_axis(grid[0], size[0]), R.grid_axis(grid[1], size[1])


def rules_halo(grid, block, halo, border="mask"):
    return R.halo_axis(grid[0], block, halo, border), R.halo_axis(grid[1], block, halo, border)


def emit_window(t, q, k, v, *, scale, bias, grid, prefix, size, shift=(0, 0), prefix_mode="global"):
    ry, rx = rules_window(grid, size, shift)
    return emit_tiled(t, q, k, v, scale=scale, bias=bias, grid=grid, prefix=prefix, rule_y=ry, rule_x=rx,
                      prefix_mode=prefix_mode)


def emit_neighborhood(t, q, k, v, *, scale, bias, grid, prefix, kernel, dilation=(1, 1), prefix_mode="global", tile=None):
    ry, rx = rules_neighborhood(grid, kernel, dilation, tile)
    return emit_tiled(t, q, k, v, scale=scale, bias=bias, grid=grid, prefix=prefix, rule_y=ry, rule_x=rx,
                      prefix_mode=prefix_mode)


def emit_grid(t, q, k, v, *, scale, bias, grid, prefix, size, prefix_mode="global"):
    ry, rx = rules_grid(grid, size)
    return emit_tiled(t, q, k, v, scale=scale, bias=bias, grid=grid, prefix=prefix, rule_y=ry, rule_x=rx,
                      prefix_mode=prefix_mode)


def emit_halo(t, q, k, v, *, scale, bias, grid, prefix, block, halo, border="mask", prefix_mode="global"):
    ry, rx = rules_halo(grid, block, halo, border)
    return emit_tiled(t, q, k, v, scale=scale, bias=bias, grid=grid, prefix=prefix, rule_y=ry, rule_x=rx,
                      prefix_mode=prefix_mode)


def emit_sliding_1d(t, q, k, v, *, scale, bias, window: int, mode: str = "centered", tile: int | None = None):
    """Text: `centered` = NATTEN 1-D (exactly `window` keys, clamped); `block` = disjoint windows."""
    length = _static(q, 2)
    window = min(window, length)
    ry = R.window_axis(1, 1)
    rx = R.neighborhood_axis(length, window, 1, tile) if mode == "centered" else R.window_axis(length, window)
    return emit_tiled(t, q, k, v, scale=scale, bias=bias, grid=(1, length), prefix=0, rule_y=ry, rule_x=rx)
