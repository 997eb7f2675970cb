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
from attnrewrite.plugins.tables import BlockTables, cdiv as _cdiv

LOG2E = 1.4426950408889634



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


@dataclasses.dataclass(frozen=True)
class Geometry:
    """One spatial kernel launch, independent of the batch: the kernel's int32 arguments after the
    strides (window: heads, P, GH, GW, WY, WX, SY, SX, n_windows_x, n_tiles, chunks; neighbourhood:
    heads, P, GH, GW, KY, KX, DY, DX, tiles_y, tiles_x, n_tiles), its tile constants and program count.
    The torch launchers and the TensorRT AOT implementation both launch from it."""

    kernel: str
    scalars: tuple[int, ...]  # after `heads`, which the launcher supplies
    constants: tuple[tuple[str, int], ...]
    programs: int  # along axis 0; axis 1 is batch · heads


def window_geometry(grid: tuple[int, int], prefix: int, size: tuple[int, int], shift=(0, 0), *,
                    block_m: int = 64, block_n: int = 64) -> Geometry:
    (gh, gw), (wy, wx) = grid, (min(size[0], grid[0]), min(size[1], grid[1]))
    sy, sx = shift[0] % wy, shift[1] % wx
    nwy, nwx = segments(gh, wy, sy), segments(gw, wx, sx)
    chunks = _cdiv(wy * wx, block_m)
    n_tiles = nwy * nwx * chunks
    return Geometry("window_attention", (prefix, gh, gw, wy, wx, sy, sx, nwx, n_tiles, chunks),
                    (("BLOCK_M", block_m), ("BLOCK_N", block_n)), n_tiles + _cdiv(prefix, block_m))


def neighborhood_geometry(grid: tuple[int, int], prefix: int, kernel: tuple[int, int], dilation=(1, 1), *,
                          tile: tuple[int, int] | None = None, block_n: int = 64) -> Geometry:
    (gh, gw), (ky, kx), (dy, dx) = grid, kernel, dilation
    if ky * dy > gh or kx * dx > gw:
        raise ValueError(f"kernel {kernel} x dilation {dilation} does not fit the grid {grid}")
    ty, tx = tile or neighborhood_tile(grid)
    tiles_y, tiles_x = _cdiv(_cdiv(gh, dy), ty), _cdiv(_cdiv(gw, dx), tx)
    n_tiles = dy * tiles_y * dx * tiles_x
    return Geometry("neighborhood_attention", (prefix, gh, gw, ky, kx, dy, dx, tiles_y, tiles_x, n_tiles),
                    (("TY", ty), ("TX", tx), ("BLOCK_N", block_n)), n_tiles + _cdiv(prefix, ty * tx))


def _launch_spatial(geometry: Geometry, q, k, v, scale: float):
    q, k, v, o = _prepare(q, k, v)
    batch, heads, _, d = q.shape
    getattr(_kernels(q), geometry.kernel)[(geometry.programs, batch * heads)](
        q, k, v, o, q.stride(0), q.stride(1), q.stride(2), heads, *geometry.scalars, scale * LOG2E,
        D=d, BLOCK_D=head_block(d), **dict(geometry.constants))
    return o


def window_attention(q, k, v, *, grid: tuple[int, int], prefix: int, size: tuple[int, int], shift=(0, 0),
                     scale: float, block_m: int = 64, block_n: int = 64):
    return _launch_spatial(window_geometry(grid, prefix, size, shift, block_m=block_m, block_n=block_n), q, k, v, scale)


def neighborhood_tile(grid: tuple[int, int]) -> tuple[int, int]:
    """Query tile: 8×8 on a 2-D grid, a run of 64 on a 1-D sequence (a 1×L grid)."""
    return (1, 64) if grid[0] == 1 else (8, 8)


def neighborhood_attention(q, k, v, *, grid: tuple[int, int], prefix: int, kernel: tuple[int, int],
                           dilation=(1, 1), scale: float, tile: tuple[int, int] | None = None, block_n: int = 64):
    return _launch_spatial(neighborhood_geometry(grid, prefix, kernel, dilation, tile=tile, block_n=block_n),
                           q, k, v, scale)


def plugin_geometry(plugin: str, fields: dict) -> Geometry:
    """The launch of a spatial plugin node, from the node's fields (`onnx_nodes.PluginCall`)."""
    if plugin == "WindowAttention":
        return window_geometry(tuple(fields["grid"]), int(fields["prefix"]), tuple(fields["window"]),
                               tuple(fields["shift"]))
    if plugin == "NeighborhoodAttention":
        return neighborhood_geometry(tuple(fields["grid"]), int(fields["prefix"]), tuple(fields["kernel"]),
                                     tuple(fields["dilation"]))
    raise ValueError(f"{plugin} has no single-kernel (AOT) launch")


def run_trt_entry(plugin: str, fields: dict, q, k, v):
    """Launch the `*_trt` entry point exactly as the TensorRT AOT plugin does (argument order, contiguous
    tensors, compiled-in scale), so its arguments are tested here rather than first inside an engine."""
    geometry = plugin_geometry(plugin, fields)
    q, k, v, o = _prepare(q, k, v)
    batch, heads, n, d = q.shape
    getattr(_kernels(q), geometry.kernel + "_trt")[(geometry.programs, batch * heads)](
        q, k, v, heads, n, *geometry.scalars, o, QK_SCALE=float(fields["scale"]) * LOG2E, D=d,
        BLOCK_D=head_block(d), **dict(geometry.constants))
    return o


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


def run_plugin(plugin: str, fields: dict, q, k, v):
    """Run the kernel a plugin node names with the node's own fields (`onnx_nodes.PluginCall.fields`).

    The TensorRT JIT implementation calls this, and the tests run it against the node's ONNX body, so
    the attributes are proven to mean what the body computes."""
    scale = float(fields["scale"])
    if plugin == "WindowAttention":
        return window_attention(q, k, v, grid=tuple(fields["grid"]), prefix=int(fields["prefix"]),
                                size=tuple(fields["window"]), shift=tuple(fields["shift"]), scale=scale)
    if plugin == "NeighborhoodAttention":
        return neighborhood_attention(q, k, v, grid=tuple(fields["grid"]), prefix=int(fields["prefix"]),
                                      kernel=tuple(fields["kernel"]), dilation=tuple(fields["dilation"]), scale=scale)
    if plugin == "BlockSparseAttention":
        tables = BlockTables.from_fields(fields, heads=q.shape[1], tokens=q.shape[2])
        return block_sparse_attention(q, k, v, tables, scale=scale, qk_bits=int(fields["qk_bits"]),
                                      pv_bits=int(fields["pv_bits"]), smooth_k=bool(fields["smooth_k"]))
    raise ValueError(f"no kernel for plugin {plugin!r}")
