"""Torch entry points of the fused kernels: shapes in, launch grid and tile sizes decided here.

Each function takes Q/K/V as `[B, h, P + N, d]` tensors (CPU tensors run under Triton's interpreter,
CUDA tensors compiled) and returns the output in the same layout and dtype. Arguments are the pass
parameters, with the meaning of the ONNX passes (see `kernels.py`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from attnrewrite.plugins.loader import interpreting, kernels

LOG2E = 1.4426950408889634


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def head_block(head_dim: int) -> int:
    """The padded head dimension: a power of two, at least 32 (int8 `tl.dot` needs k ≥ 32 on sm_80+)."""
    return max(32, 1 << (head_dim - 1).bit_length())


def _prepare(q, k, v):
    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        raise ValueError(f"q, k, v must share one [B, h, N, d] shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    q, k, v = (x.contiguous() for x in (q, k, v))
    return q, k, v, q.new_empty(q.shape)


def _kernels(q):
    """The kernel module for tensors on `q`'s device: CPU tensors need the interpreter, CUDA ones not."""
    if (q.device.type == "cuda") == interpreting():
        mode = "interpreted (TRITON_INTERPRET=1)" if interpreting() else "compiled"
        raise ValueError(f"triton kernels are {mode} in this process and cannot run on {q.device.type} tensors")
    return kernels()


def segments(length: int, size: int, shift: int) -> int:
    """Windows along one axis in the cut-point form (a shift adds the partial first segment)."""
    s = shift % size
    return _cdiv(length, size) if s == 0 else 1 + _cdiv(length - s, size)


def window_attention(q, k, v, *, grid: tuple[int, int], prefix: int, size: tuple[int, int], shift=(0, 0),
                     scale: float, block_m: int = 64, block_n: int = 64):
    q, k, v, o = _prepare(q, k, v)
    (gh, gw), (wy, wx) = grid, (min(size[0], grid[0]), min(size[1], grid[1]))
    sy, sx = shift[0] % wy, shift[1] % wx
    nwy, nwx = segments(gh, wy, sy), segments(gw, wx, sx)
    chunks = _cdiv(wy * wx, block_m)
    n_tiles = nwy * nwx * chunks
    batch, heads, _, d = q.shape
    launch = (n_tiles + _cdiv(prefix, block_m), batch * heads)
    _kernels(q).window_attention[launch](
        q, k, v, o, q.stride(0), q.stride(1), q.stride(2), heads, prefix, gh, gw, wy, wx, sy, sx, nwx, n_tiles, chunks,
        scale * LOG2E, D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(d))
    return o


def neighborhood_tile(grid: tuple[int, int]) -> tuple[int, int]:
    """Query tile: 8×8 on a 2-D grid, a run of 64 on a 1-D sequence (a 1×L grid)."""
    return (1, 64) if grid[0] == 1 else (8, 8)


def neighborhood_attention(q, k, v, *, grid: tuple[int, int], prefix: int, kernel: tuple[int, int],
                           dilation=(1, 1), scale: float, tile: tuple[int, int] | None = None, block_n: int = 64):
    q, k, v, o = _prepare(q, k, v)
    (gh, gw), (ky, kx), (dy, dx) = grid, kernel, dilation
    if ky * dy > gh or kx * dx > gw:
        raise ValueError(f"kernel {kernel} x dilation {dilation} does not fit the grid {grid}")
    ty, tx = tile or neighborhood_tile(grid)
    tiles_y, tiles_x = _cdiv(_cdiv(gh, dy), ty), _cdiv(_cdiv(gw, dx), tx)
    n_tiles = dy * tiles_y * dx * tiles_x
    batch, heads, _, d = q.shape
    launch = (n_tiles + _cdiv(prefix, ty * tx), batch * heads)
    _kernels(q).neighborhood_attention[launch](
        q, k, v, o, q.stride(0), q.stride(1), q.stride(2), heads, prefix, gh, gw, ky, kx, dy, dx, tiles_y, tiles_x,
        n_tiles, scale * LOG2E, D=d, TY=ty, TX=tx, BLOCK_N=block_n, BLOCK_D=head_block(d))
    return o


@dataclasses.dataclass(frozen=True)
class BlockTables:
    """PARO's tables as the block-sparse kernels read them (int32, `-1` = padding slot).

    Positions are each head's order of the blocked tokens (`blocks` count them in blocks), then the
    global tokens in their own trailing blocks, so one prepared layout holds every key a query sees."""

    order: np.ndarray  # [h, (nb + ngb)·block]: position → token
    blocks: np.ndarray  # [h, nb, kept]: kept key blocks per query block
    global_idx: np.ndarray  # [G]: tokens every query attends to, and that attend to every key
    block: int

    @property
    def global_blocks(self) -> int:
        return _cdiv(len(self.global_idx), self.block)

    @classmethod
    def from_paro(cls, frame, tables) -> "BlockTables":
        heads, nb, _ = tables.blocks.shape
        glob = np.asarray(frame.global_idx, np.int32)
        order = np.full((heads, (nb + _cdiv(len(glob), tables.block)) * tables.block), -1, np.int32)
        for h in range(heads):
            tokens = frame.order(tables.orders[h])
            order[h, :len(tokens)] = tokens
            order[h, nb * tables.block:nb * tables.block + len(glob)] = glob
        return cls(order, tables.blocks.astype(np.int32), glob, tables.block)


def block_sparse_attention(q, k, v, tables: BlockTables, *, scale: float, qk_bits: int = 8, pv_bits: int = 8,
                           smooth_k: bool = False, num_warps: int | None = None, num_stages: int | None = None):
    """`qk_bits` 8 (±127), 4 (±7 held in int8: the INT4 range, int8 speed) or 16 (float); `pv_bits` 8 or 16.

    Two launches: `block_sparse_prepare` lays Q/K/V out in each head's order and quantises them once,
    then `block_sparse_attention` runs on contiguous blocks."""
    import torch

    if qk_bits not in (4, 8, 16) or pv_bits not in (8, 16):
        raise ValueError(f"{qk_bits=} must be 4, 8 or 16 and {pv_bits=} 8 or 16")
    if tables.block & (tables.block - 1) or tables.block < 16:
        raise ValueError(f"block {tables.block} must be a power of two >= 16 for the kernel")
    if pv_bits == 8 and tables.block < 32:
        raise ValueError(f"int8 P·V needs block >= 32 (an int8 dot reduces over >= 32 keys), got {tables.block}")
    q, k, v, o = _prepare(q, k, v)
    batch, heads, n, d = q.shape
    bd, dev, f32 = head_block(d), q.device, torch.float32
    order, blocks, glob = (torch.as_tensor(np.ascontiguousarray(a), device=dev) for a in
                           (tables.order, tables.blocks, tables.global_idx if len(tables.global_idx) else np.zeros(1, np.int32)))
    nb, kept = tables.blocks.shape[1], tables.blocks.shape[2]
    positions = tables.order.shape[1]
    qk_int, pv_int = qk_bits != 16, pv_bits == 8
    qk_dtype = torch.int8 if qk_int else q.dtype
    qp, kp = (torch.empty(batch * heads, positions, bd, dtype=qk_dtype, device=dev) for _ in range(2))
    vp = torch.empty(batch * heads, positions, bd, dtype=torch.int8 if pv_int else q.dtype, device=dev)
    unused = torch.empty(1, dtype=f32, device=dev)  # float32 like the pointer it stands for (one AOT signature)
    scales = [torch.empty(batch * heads, positions, dtype=f32, device=dev) for _ in range(2)] if qk_int else [unused] * 2
    v_scale = torch.empty(batch * heads, positions // tables.block, bd, dtype=f32, device=dev) if pv_int else unused
    k_mean = k.float().mean(dim=2).contiguous() if smooth_k else unused
    module, levels = _kernels(q), {8: 127, 4: 7, 16: 0}[qk_bits]
    module.block_sparse_prepare[(positions // tables.block, batch * heads)](
        q, k, v, order, k_mean, qp, kp, vp, scales[0], scales[1], v_scale, q.stride(0), q.stride(1), q.stride(2),
        heads, positions, D=d, BLOCK=tables.block, BLOCK_D=bd, QK_LEVELS=levels, PV_INT8=pv_int, HAS_K_MEAN=smooth_k)
    n_global = len(tables.global_idx)
    module.block_sparse_attention[(nb + _cdiv(n_global, tables.block), batch * heads)](
        q, k, v, o, order, blocks, glob, qp, kp, vp, scales[0], scales[1], v_scale, q.stride(0), q.stride(1), q.stride(2),
        heads, n, n_global, nb, tables.global_blocks, kept, scale * LOG2E,
        D=d, BLOCK=tables.block, BLOCK_D=bd, QK_LEVELS=levels, PV_INT8=pv_int, PADDED=bool((tables.order < 0).any()),
        **_launch_options(tables.block, num_warps, num_stages))
    return o


def _launch_options(block: int, num_warps: int | None, num_stages: int | None) -> dict:
    """4 warps (one Hopper warpgroup) and 3 stages: the fastest of warps 4/8 × stages 2/3 for blocks of
    64 and 128 on an H200 (benchmarks/gpu.py --sweep, docs/measured/gpu_h200_2026-11-30.json)."""
    del block  # the same choice won for both block sizes
    return {"num_warps": num_warps or 4, "num_stages": num_stages or 3}


def dense_attention(q, k, v, *, scale: float):
    """The plain softmax attention every kernel reduces to at its exactness anchor (torch, float32)."""
    import torch

    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(logits, dim=-1), v.float()).to(q.dtype)


def tokens(grid: tuple[int, int], prefix: int) -> int:
    return prefix + math.prod(grid)
