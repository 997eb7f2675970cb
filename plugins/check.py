"""Every fused kernel against the reference of its pass, on small shapes: `attnrewrite kernels check`.

The references are the passes' own definitions (`passes/spatial/reference.py` masks,
`passes/paro.keep_mask`, `passes/quantize.quant_attention_reference`), evaluated in float64/float32
numpy on the same (dtype-rounded) inputs, so a kernel is judged on its math, not on input rounding.
Each family also runs its exactness anchor (a window or kernel covering the grid, density 1).

Tolerances are absolute on outputs of size ~1: float32 1e-5; float16 4e-3 and bfloat16 3e-2 (the
P·V product is rounded to the I/O dtype, as in every flash kernel). Integer Q·Kᵀ is exact, so those
cases compare with the quantised reference at the float tolerance. Integer P·V is quantised per key
block against the running row maximum (it cannot know the final maximum, unlike the ONNX pass), so
it is compared with float attention and must stay within twice the error of the ONNX INT8 reference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from attnrewrite.passes import paro as PA
from attnrewrite.passes import quantize as Qz
from attnrewrite.passes.spatial import reference as R
from attnrewrite.plugins.tables import BlockTables

TOLERANCE = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
DTYPES = tuple(TOLERANCE)
#: Triton 3.9's interpreter gets bf16 `tl.dot` wrong (a 16×16 probe is off by 1e10), so bfloat16 is
#: checked on a GPU only
INTERPRETER_DTYPES = ("float32", "float16")
#: int8 everywhere on the GPU: Q has the full ±127 (the 7-bit Q of the CPU pass is an AVX2 detail)
GPU_INT8 = Qz.Format(8, 127, 127, 127, 127, native=True)


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str
    name: str
    run: Callable  # (q, k, v) torch tensors → output tensor
    reference: Callable  # (q, k, v) float64/float32 numpy → (expected output, tolerance or None for the dtype's)
    grid: tuple[int, int]
    prefix: int
    heads: int = 2
    head_dim: int = 16


@dataclasses.dataclass(frozen=True)
class Result:
    kernel: str
    case: str
    dtype: str
    max_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.max_error <= self.tolerance)

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "case": self.case, "dtype": self.dtype, "max_error": self.max_error,
                "tolerance": self.tolerance, "ok": self.ok}


def _spatial(family: str, name: str, grid, prefix: int, allowed: np.ndarray, **params) -> Case:
    from attnrewrite.plugins import launch as L

    fn = getattr(L, family)
    return Case(family, name, lambda q, k, v: fn(q, k, v, grid=grid, prefix=prefix, scale=0.3, **params),
                lambda q, k, v: (R.masked_attention(q, k, v, 0.3, allowed), None), grid, prefix)


def _paro_frame(grid, prefix: int, block: int, kept: int, heads: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = prefix + math.prod(grid)
    frame = PA.Frame(tokens=n, global_idx=tuple(range(prefix)), blocked=tuple(range(prefix, n)), grid=grid, grid_start=0)
    nb = math.ceil(math.prod(grid) / block)
    blocks = np.stack([PA.select_blocks(rng.random((nb, nb)), kept, True) for _ in range(heads)])
    orders = tuple(("hw", "wh", "tile:4")[h % 3] for h in range(heads))
    return frame, PA.Tables(orders, blocks, (1.0,) * heads, block)


def _block_sparse(name: str, grid, prefix: int, *, block: int, kept: int, qk_bits: int, pv_bits: int,
                  smooth_k: bool = False, heads: int = 3) -> Case:
    from attnrewrite.plugins import launch as L

    frame, tables = _paro_frame(grid, prefix, block, kept, heads)
    keep = PA.keep_mask(frame, tables)[None]
    bt = BlockTables.from_paro(frame, tables)
    qk = {8: GPU_INT8, 4: Qz.FORMATS[4], 16: None}[qk_bits]

    def reference(q, k, v):
        float_cfg = Qz.QuantConfig(qk=qk, pv=None, smooth_k=smooth_k, smooth_v=False, granularity="token")
        exact = Qz.quant_attention_reference(q, k, v, scale=0.3, cfg=float_cfg, keep=keep)["output"]
        # the kernel's global rows are float attention over all keys
        exact[:, :, list(frame.global_idx)] = R.masked_attention(q, k, v, 0.3, keep[0])[:, :, list(frame.global_idx)]
        if pv_bits == 16:
            return exact, None
        onnx_int8 = dataclasses.replace(float_cfg, pv=GPU_INT8)
        quantised = Qz.quant_attention_reference(q, k, v, scale=0.3, cfg=onnx_int8, keep=keep)["output"]
        return exact, 2.0 * float(np.abs(quantised - exact).max())

    return Case("block_sparse_attention", name,
                lambda q, k, v: L.block_sparse_attention(q, k, v, bt, scale=0.3, qk_bits=qk_bits, pv_bits=pv_bits,
                                                         smooth_k=smooth_k),
                reference, grid, prefix, heads=heads, head_dim=24)


def cases() -> list[Case]:
    """The check set: every family's semantics (prefix, shift, clamp, dilation, 1-D, tables, integers)."""
    g = (9, 10)
    return [
        _spatial("window_attention", "4x4, 1 prefix", g, 1, R.allowed_window(g, 1, (4, 4)), size=(4, 4)),
        _spatial("window_attention", "4x3 shift 2x1, 2 prefix", g, 2, R.allowed_window(g, 2, (4, 3), (2, 1)),
                 size=(4, 3), shift=(2, 1)),
        _spatial("window_attention", "anchor: window = grid", g, 1, np.ones((91, 91), bool), size=g),
        _spatial("neighborhood_attention", "3x5, 1 prefix", g, 1, R.allowed_neighborhood(g, 1, (3, 5)), kernel=(3, 5)),
        _spatial("neighborhood_attention", "3x3 dilation 2x3", (12, 10), 0,
                 R.allowed_neighborhood((12, 10), 0, (3, 3), (2, 3)), kernel=(3, 3), dilation=(2, 3)),
        _spatial("neighborhood_attention", "1-D window 7, 1 global", (1, 40), 1, R.allowed_sliding_1d(41, 7, 1),
                 kernel=(1, 7)),
        _spatial("neighborhood_attention", "anchor: kernel = grid", g, 1, np.ones((91, 91), bool), kernel=g),
        _block_sparse("float, 4 of 16 blocks", (16, 16), 1, block=16, kept=4, qk_bits=16, pv_bits=16),
        _block_sparse("int8 QK, float PV", (16, 16), 1, block=16, kept=4, qk_bits=8, pv_bits=16),
        _block_sparse("int4-range QK, smooth K", (16, 16), 1, block=16, kept=4, qk_bits=4, pv_bits=16, smooth_k=True),
        _block_sparse("int8 QK + int8 PV, smooth K", (16, 16), 1, block=32, kept=2, qk_bits=8, pv_bits=8, smooth_k=True),
        _block_sparse("anchor: density 1, float", (12, 12), 2, block=16, kept=9, qk_bits=16, pv_bits=16),
    ]


def run_case(case: Case, dtype: str, device: str = "cpu", seed: int = 0) -> Result:
    import torch

    rng = np.random.default_rng(seed)
    n = case.prefix + math.prod(case.grid)
    shape = (2, case.heads, n, case.head_dim)
    tensors = [torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(getattr(torch, dtype)) for _ in range(3)]
    tensors[1] = tensors[1] + 1.0  # a shared key offset, what K smoothing removes
    out = case.run(*(t.to(device) for t in tensors)).float().cpu().numpy()
    expected, tol = case.reference(*(t.float().numpy() for t in tensors))
    tol = max(TOLERANCE[dtype], tol or 0.0)
    return Result(case.kernel, case.name, dtype, float(np.abs(out - expected).max()), tol)


def run_all(dtypes=DTYPES, device: str = "cpu", progress=None) -> list[Result]:
    results = []
    for case in cases():
        for dtype in dtypes:
            results.append(run_case(case, dtype, device))
            if progress:
                progress()
    return results
