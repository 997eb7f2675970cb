"""1-D sliding-window attention for sequences whose length is only known at run time.

Text models are exported with a dynamic sequence axis, so the static tables of `spatial_tables.py`
cannot be laid out. Here the same computation is built from the length inside the graph: the L
local tokens (after the P global ones) are cut into blocks of `tile` queries; block b attends to one
contiguous key region of R tokens that holds every key any of its queries may see, so the work is
still one batched MatMul per head, over `[B, h, blocks, tile, P + R]` logits instead of `[T, T]`.

    s(i) = clamp(i − ⌊w/2⌋, 0, max(L − w, 0))      first key of local query i (`centered`, NATTEN 1-D)
    lo(b) = min(s(b·tile), M − R)                   region start; M = max(blocks·tile, R) padded keys
    allowed(i, j) = s(i) ≤ j < s(i) + w  and  j < L

`block` mode is disjoint blocks of w tokens (tile = R = w, allowed iff j < L). Queries and keys are
zero-padded to whole blocks and the padded keys masked, so any L ≥ 1 works, including L < w (every
query then sees all L tokens, as in the static form). Only a per-key bias (a padding mask) can be
gathered without knowing the length; sites with a query-dependent bias are declined by the passes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes.ops import const, key_row
from attnrewrite.passes.spatial.tables import bias_floor, masked_value

_INT64_MAX = np.iinfo(np.int64).max


def _tokens(t, x: ir.Value, start, end) -> ir.Value:
    """x[:, :, start:end] where start/end are ints or int64 [1] values."""
    start = start if isinstance(start, ir.Value) else const(t, [start])
    end = end if isinstance(end, ir.Value) else const(t, [end])
    return t.op("Slice", [x, start, end, const(t, [2])])


def _pad_tokens(t, x: ir.Value, amount: ir.Value, axis: int, rank: int) -> ir.Value:
    """Zero-pad `amount` (int64 [1]) positions at the end of `axis`."""
    before = const(t, [0] * (rank + axis))
    after = const(t, [0] * (rank - axis - 1))
    pads = t.op("Concat", [before, amount, after], attributes={"axis": 0})
    return t.op("Pad", [x, pads])


def _per_block(t, x: ir.Value, blocks: ir.Value) -> ir.Value:
    """[B, h, P, d] → [B, h, blocks, P, d]: the global keys repeated for every block."""
    shape = t.op("Concat", [const(t, [1, 1]), blocks, const(t, [1, 1])], attributes={"axis": 0})
    return t.op("Expand", [t.op("Unsqueeze", [x, const(t, [2])]), shape])


def emit_sliding_1d_dynamic(t: ir_tape.Tape, q: ir.Value, k: ir.Value, v: ir.Value, *, scale: float,
                            bias: ir.Value | None, window: int, mode: str = "centered", prefix: int = 0,
                            prefix_mode: str = "global", bias_per_key: bool = False) -> ir.Value:
    """Sliding-window (`centered`) or block (`block`) attention of `[B, h, T, d]` Q/K/V, T symbolic.

    `bias_per_key`: the bias is known to be the same for every query even though it is laid out as
    `[.., T, T]` (an expanded padding mask), so its first row stands for all.
    """
    if bias is not None and bias_per_key:
        bias = key_row(t, bias)
    if mode not in ("centered", "block"):
        raise ValueError(f"{mode=} must be centered or block")
    if window < 1:
        raise ValueError(f"{window=} must be >= 1")
    d, dv = q.shape[3], v.shape[3]
    dtype = q.dtype.numpy()
    w = window
    tile = w
    region = tile + w - 1 if mode == "centered" else w
    global_prefix = prefix > 0 and prefix_mode == "global"

    total = t.op("Shape", [q], attributes={"start": 2, "end": 3})  # [1]
    local = t.op("Sub", [total, const(t, [prefix])])
    blocks = t.op("Div", [t.op("Add", [local, const(t, [tile - 1])]), const(t, [tile])])
    padded_q = t.op("Mul", [blocks, const(t, [tile])])
    padded_k = t.op("Max", [padded_q, const(t, [region])])

    # positions: query i = b·tile + u, region key j = lo(b) + r
    b = t.op("Range", [const(t, 0), t.op("Squeeze", [blocks, const(t, [0])]), const(t, 1)])  # [blocks]
    first = t.op("Mul", [b, const(t, tile)])
    if mode == "centered":
        last_start = t.op("Max", [t.op("Sub", [local, const(t, [w])]), const(t, [0])])

        def start_of(i):
            return t.op("Min", [t.op("Max", [t.op("Sub", [i, const(t, w // 2)]), const(t, 0)]), last_start])

        query = t.op("Add", [t.op("Unsqueeze", [first, const(t, [1])]), const(t, np.arange(tile)[None, :])])
        starts = start_of(query)  # [blocks, tile]
        lo = t.op("Min", [start_of(first), t.op("Sub", [padded_k, const(t, [region])])])  # [blocks]
    else:
        lo = first
    keys = t.op("Add", [t.op("Unsqueeze", [lo, const(t, [1])]), const(t, np.arange(region)[None, :])])  # [blocks, R]
    key3 = t.op("Unsqueeze", [keys, const(t, [1])])  # [blocks, 1, R]
    allowed = t.op("Less", [key3, local])
    if mode == "centered":
        s3 = t.op("Unsqueeze", [starts, const(t, [2])])  # [blocks, tile, 1]
        inside = t.op("And", [t.op("GreaterOrEqual", [key3, s3]), t.op("Less", [key3, t.op("Add", [s3, const(t, w)])])])
        allowed = t.op("And", [allowed, inside])
    zero, masked = (t.op("Constant", [], attributes={"value": ir.tensor(np.array(x, dtype))}) for x in (0.0, masked_value(dtype)))
    mask = t.op("Where", [allowed, zero, masked])  # [blocks, tile|1, R]
    if global_prefix:
        mask = t.op("Pad", [mask, const(t, [0, 0, prefix, 0, 0, 0])])  # prefix key columns: 0

    scale_c = t.op("Constant", [], attributes={"value": ir.tensor(np.array(scale, dtype))})
    k_local, v_local = _tokens(t, k, prefix, _INT64_MAX), _tokens(t, v, prefix, _INT64_MAX)
    key_pad = t.op("Sub", [padded_k, local])
    flat_keys = t.op("Reshape", [keys, const(t, [-1])])

    def regions(x, width):
        gathered = t.op("Gather", [_pad_tokens(t, x, key_pad, 2, 4), flat_keys], attributes={"axis": 2})
        return t.op("Reshape", [gathered, const(t, [0, 0, -1, region, width])])

    k_reg, v_reg = regions(k_local, d), regions(v_local, dv)
    if global_prefix:
        k_reg = t.op("Concat", [_per_block(t, _tokens(t, k, 0, prefix), blocks), k_reg], attributes={"axis": 3})
        v_reg = t.op("Concat", [_per_block(t, _tokens(t, v, 0, prefix), blocks), v_reg], attributes={"axis": 3})
    q_local = _pad_tokens(t, _tokens(t, q, prefix, _INT64_MAX), t.op("Sub", [padded_q, local]), 2, 4)
    q_blocks = t.op("Reshape", [t.op("Mul", [q_local, scale_c]), const(t, [0, 0, -1, tile, d])])
    logits = t.op("MatMul", [q_blocks, t.op("Transpose", [k_reg], attributes={"perm": [0, 1, 2, 4, 3]})])
    logits = t.op("Add", [logits, mask])
    if bias is not None:
        logits = t.op("Add", [logits, _key_bias(t, bias, prefix, global_prefix, blocks, local, key_pad, flat_keys,
                                                region, dtype)])
    out = t.op("MatMul", [t.op("Softmax", [logits], attributes={"axis": -1}), v_reg])
    out = t.op("Reshape", [out, const(t, [0, 0, -1, dv])])
    out = _tokens(t, out, 0, local)
    if prefix:
        qp = t.op("Mul", [_tokens(t, q, 0, prefix), scale_c])
        keys_p, values_p = (k, v) if global_prefix else (_tokens(t, k, 0, prefix), _tokens(t, v, 0, prefix))
        logits_p = t.op("MatMul", [qp, t.op("Transpose", [keys_p], attributes={"perm": [0, 1, 3, 2]})])
        if bias is not None:
            bias4 = _as_rank4(t, bias)
            logits_p = t.op("Add", [logits_p, bias4 if global_prefix else t.op(
                "Slice", [bias4, const(t, [0]), const(t, [prefix]), const(t, [3])])])
        out_p = t.op("MatMul", [t.op("Softmax", [logits_p], attributes={"axis": -1}), values_p])
        out = t.op("Concat", [out_p, out], attributes={"axis": 2})
    out.type = q.type
    out.shape = ir.Shape([q.shape[0], q.shape[1], q.shape[2], dv])
    return out


def _as_rank4(t, bias: ir.Value) -> ir.Value:
    rank = len(bias.shape)
    return bias if rank == 4 else t.op("Unsqueeze", [bias, const(t, list(range(4 - rank)))])


def _key_bias(t, bias, prefix, global_prefix, blocks, local, key_pad, flat_keys, region, dtype) -> ir.Value:
    """A per-key bias `[B|1, h|1, 1, T]` at each block's key slots: `[B|1, h|1, blocks, 1, P + R]`."""
    if bias.shape is None or len(bias.shape) > 4 or (len(bias.shape) >= 2 and bias.shape[-2] != 1):
        raise ValueError(f"bias {bias.name} of shape {bias.shape} varies per query; only a per-key bias fits a "
                         "dynamic-length sliding window")
    rows = t.op("Reshape", [_as_rank4(t, bias), const(t, [0, 0, -1])])  # [B|1, h|1, T]
    local_cols = _tokens(t, rows, prefix, _INT64_MAX)
    gathered = t.op("Gather", [_pad_tokens(t, local_cols, key_pad, 2, 3), flat_keys], attributes={"axis": 2})
    cols = t.op("Unsqueeze", [t.op("Reshape", [gathered, const(t, [0, 0, -1, region])]), const(t, [3])])
    if global_prefix:
        shape = t.op("Concat", [const(t, [1, 1]), blocks, const(t, [1, 1])], attributes={"axis": 0})
        pre = t.op("Expand", [t.op("Unsqueeze", [_tokens(t, rows, 0, prefix), const(t, [2, 3])]), shape])
        cols = t.op("Concat", [pre, cols], attributes={"axis": 4})
    floor = t.op("Constant", [], attributes={"value": ir.tensor(np.array(bias_floor(dtype), dtype))})
    return t.op("Max", [cols, floor])
