"""The fused Triton kernels on a GPU: time vs dense SDPA and vs the same variant in FlexAttention.

For each variant and size (64×64 = 4096 and 128×128 = 16384 grid tokens, fp16, B=1, 16 heads, d 64):
the kernel's time, torch's dense `scaled_dot_product_attention` on the same Q/K/V, and FlexAttention
(`torch.compile`d, block mask built from the same mask rule, BLOCK_SIZE 128) at equal semantics. All
three run in the same process, interleaved per row; ratios are times divided by the kernel's. Each row
also reports the kernel's max error against FlexAttention (block-sparse: dense SDPA with the tables'
boolean mask, so int8 rows show their quantisation error), and the
run starts with `attnrewrite kernels check` on the device (bfloat16 included).

Goals (issue 11): window and neighbourhood at least 0.9× FlexAttention's speed, block-sparse INT8 at
density 0.25 at least 2.5× faster than dense SDPA.

    python benchmarks/gpu.py                      # needs CUDA; writes --json if given
    python benchmarks/gpu.py --smoke               # CPU: tiny shapes, eager flex, no timing claims
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np


def variants(smoke: bool):
    """(label, family, params, mask rule for flex) per row; sizes scale down under --smoke."""
    if smoke:
        return [("window 4x4", "window", {"size": (4, 4)}), ("neighborhood 5x5", "neighborhood", {"kernel": (5, 5)}),
                ("neighborhood 3x3 dil 2", "neighborhood", {"kernel": (3, 3), "dilation": (2, 2)}),
                ("block-sparse 0.25 fp16", "paro", {"density": 0.25, "qk_bits": 16, "pv_bits": 16}),
                ("block-sparse 0.25 int8", "paro", {"density": 0.25, "qk_bits": 8, "pv_bits": 8})]
    return [("window 16x16", "window", {"size": (16, 16)}),
            ("window 8x8 shift 4", "window", {"size": (8, 8), "shift": (4, 4)}),
            ("neighborhood 13x13", "neighborhood", {"kernel": (13, 13)}),
            ("neighborhood 7x7 dil 2", "neighborhood", {"kernel": (7, 7), "dilation": (2, 2)}),
            ("block-sparse 0.25 fp16", "paro", {"density": 0.25, "qk_bits": 16, "pv_bits": 16}),
            ("block-sparse 0.25 int8", "paro", {"density": 0.25, "qk_bits": 8, "pv_bits": 8}),
            ("block-sparse 0.25 int8 QK", "paro", {"density": 0.25, "qk_bits": 8, "pv_bits": 16}),
            ("block-sparse 0.5 int8", "paro", {"density": 0.5, "qk_bits": 8, "pv_bits": 8}),
            ("block-sparse 0.25 int8, block 128", "paro", {"density": 0.25, "qk_bits": 8, "pv_bits": 8, "block": 128}),
            ("block-sparse 0.25 fp16, block 128", "paro", {"density": 0.25, "qk_bits": 16, "pv_bits": 16, "block": 128})]


def axis_masks(family: str, params: dict, side: int, device: str):
    """The pass reference's per-axis masks `[side, side]` as tensors for flex's mask_mod: one mask_mod
    code for every variant, so torch.compile builds one flex kernel per size, not one per variant."""
    import torch

    from attnrewrite.passes.spatial import reference as R

    if family == "window":
        masks = [R.window_axis_mask(side, params["size"][a], params.get("shift", (0, 0))[a]) for a in (0, 1)]
    else:
        masks = [R.neighborhood_axis_mask(side, params["kernel"][a], params.get("dilation", (1, 1))[a]) for a in (0, 1)]
    return [torch.as_tensor(m, device=device) for m in masks]


def keep_tokens(bt, n: int, device: str):
    """bool [h, N, N] in token order from block tables: what dense SDPA must mask to equal the kernel."""
    import torch

    order = torch.as_tensor(bt.order, device=device).long()
    blocks = torch.as_tensor(bt.blocks, device=device).long()
    heads, nb, _ = blocks.shape
    per_block = torch.zeros(heads, nb, nb, dtype=torch.bool, device=device).scatter_(2, blocks, True)
    by_position = per_block.repeat_interleave(bt.block, 1).repeat_interleave(bt.block, 2)[:, :n, :n]
    position = torch.empty_like(order[:, :n]).scatter_(1, order[:, :n], torch.arange(n, device=device).expand(heads, n))
    rows = torch.gather(by_position, 1, position[:, :, None].expand(heads, n, n))
    return torch.gather(rows, 2, position[:, None, :].expand(heads, n, n))


def paro_tables(grid, heads: int, density: float, block: int, seed: int = 0):
    """Random PARO tables at a density: speed depends only on the kept count (orders hw/wh alternate)."""
    from attnrewrite.passes import paro as PA
    from attnrewrite.plugins.tables import BlockTables

    n = math.prod(grid)
    nb = math.ceil(n / block)
    kept = max(1, round(density * nb))
    rng = np.random.default_rng(seed)
    frame = PA.Frame(tokens=n, global_idx=(), blocked=tuple(range(n)), grid=grid, grid_start=0)
    blocks = np.stack([PA.select_blocks(rng.random((nb, nb)), kept, True) for _ in range(heads)])
    tables = PA.Tables(tuple(("hw", "wh")[h % 2] for h in range(heads)), blocks, (1.0,) * heads, block)
    return frame, tables, BlockTables.from_paro(frame, tables)


def timer(device: str, repeats: int):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=max(25, repeats))
    return lambda fn: (lambda t: (fn(), (time.perf_counter() - t) * 1e3)[1])(time.perf_counter())


def run(args) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnrewrite.plugins import launch as L

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.float16
    sides = [8] if args.smoke else args.sides
    heads, d = (2, 16) if args.smoke else (args.heads, 64)
    time_ms = timer(device, args.repeats)
    flex = flex_attention if args.smoke else torch.compile(flex_attention, dynamic=False)
    rows = []
    for side in sides:
        grid, n = (side, side), side * side
        q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=dtype) for _ in range(3))
        scale = d ** -0.5
        t_dense = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        dense = F.scaled_dot_product_attention(q, k, v)
        for label, family, params in variants(args.smoke):
            block_mask, extra = None, {}
            if family == "paro":
                block = 32 if args.smoke else params.get("block", 64)
                _, _, bt = paro_tables(grid, heads, params["density"], block)
                kernel = lambda: L.block_sparse_attention(q, k, v, bt, scale=scale, qk_bits=params["qk_bits"],  # noqa: E731
                                                          pv_bits=params["pv_bits"])
                extra = {"kept_blocks": int(bt.blocks.shape[2]), "blocks": int(bt.blocks.shape[1])}
                expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_tokens(bt, n, device)[None])
            else:
                fn = L.window_attention if family == "window" else L.neighborhood_attention
                kernel = lambda: fn(q, k, v, grid=grid, prefix=0, scale=scale, **params)  # noqa: E731
                ry, rx = axis_masks(family, params, side, device)

                def mask_mod(b, h, qi, ki, ry=ry, rx=rx, side=side):
                    return ry[qi // side, ki // side] & rx[qi % side, ki % side]

                block_mask = create_block_mask(mask_mod, None, None, n, n, device=device,
                                               BLOCK_SIZE=16 if args.smoke else 128)
                expected = flex(q, k, v, block_mask=block_mask, scale=scale)
            out = kernel()
            t_kernel = time_ms(kernel)
            t_flex = time_ms(lambda: flex(q, k, v, block_mask=block_mask, scale=scale)) if block_mask is not None else None
            ref = expected
            row = {"variant": label, "tokens": n, "kernel_ms": t_kernel, "sdpa_ms": t_dense, "flex_ms": t_flex,
                   "vs_sdpa": t_dense / t_kernel, "vs_flex": (t_flex / t_kernel) if t_flex else None,
                   "max_error": float((out.float() - ref.float()).abs().max()) if ref is not None else None,
                   "block_sparsity": float(block_mask.sparsity()) / 100 if block_mask is not None else None, **extra}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del dense
    return rows


def sweep(args) -> list[dict]:
    """Launch options of the block-sparse kernel at the largest size: block × warps × stages, per format."""
    import torch
    import torch.nn.functional as F

    from attnrewrite.plugins import launch as L

    side = max(args.sides)
    n, heads = side * side, args.heads
    q, k, v = (torch.randn(1, heads, n, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    time_ms = timer("cuda", args.repeats)
    t_dense = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    rows = []
    for block in (64, 128):
        _, _, bt = paro_tables((side, side), heads, 0.25, block)
        for bits in ((16, 16), (8, 16), (8, 8)):
            for warps in (4, 8):
                for stages in (2, 3):
                    fn = lambda: L.block_sparse_attention(q, k, v, bt, scale=0.125, qk_bits=bits[0], pv_bits=bits[1],  # noqa: E731
                                                          num_warps=warps, num_stages=stages)
                    try:
                        t = time_ms(fn)
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
                        rows.append({"block": block, "bits": bits, "warps": warps, "stages": stages, "error": str(exc)[:200]})
                        continue
                    rows.append({"block": block, "bits": bits, "warps": warps, "stages": stages, "ms": t,
                                 "vs_sdpa": t_dense / t})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def check_on_device(smoke: bool) -> list[dict]:
    from attnrewrite.plugins import check

    dtypes = check.INTERPRETER_DTYPES if smoke else check.DTYPES
    return [r.to_json() for r in check.run_all(dtypes, device="cpu" if smoke else "cuda")]


def table(rows: list[dict], checks: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    bad = [c for c in checks if not c["ok"]]
    console.print(f"kernels check on {meta['device']}: {len(checks) - len(bad)}/{len(checks)} within tolerance")
    for c in bad:
        console.print(f"  MISMATCH {c['kernel']} {c['case']} {c['dtype']}: {c['max_error']:.2e} > {c['tolerance']:.1e}")
    t = Table(title=f"fused kernels, {meta['dtype']}, B=1, {meta['heads']} heads, d={meta['head_dim']} ({meta['device']})")
    for col in ("variant", "tokens", "kernel ms", "SDPA ms", "flex ms", "× vs SDPA", "× vs flex", "max err"):
        t.add_column(col, justify="right")
    fmt = lambda x, f="{:.3f}": "-" if x is None else f.format(x)  # noqa: E731
    for r in rows:
        t.add_row(r["variant"], str(r["tokens"]), fmt(r["kernel_ms"]), fmt(r["sdpa_ms"]), fmt(r["flex_ms"]),
                  fmt(r["vs_sdpa"], "{:.2f}"), fmt(r["vs_flex"], "{:.2f}"), fmt(r["max_error"], "{:.1e}"))
    console.print(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: the script runs, no timings")
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 128], help="grid sides (tokens = side²)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=100, help="ms of timed repetitions per measurement (do_bench rep)")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time the block-sparse launch options (GPU)")
    parser.add_argument("--json", help="write rows, checks and device to this file")
    args = parser.parse_args()
    if args.smoke:  # before anything imports triton: the mode is fixed at its import (plugins/loader.py)
        from attnrewrite.plugins.loader import use_interpreter

        use_interpreter()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (or --smoke on CPU)")
    meta = {"device": torch.cuda.get_device_name() if not args.smoke else "cpu (interpreter, smoke)",
            "dtype": "float32" if args.smoke else "float16", "heads": 2 if args.smoke else args.heads,
            "head_dim": 16 if args.smoke else 64, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    import triton

    meta["triton"] = triton.__version__
    checks = [] if args.no_check else check_on_device(args.smoke)
    rows = run(args)
    table(rows, checks, meta)
    swept = sweep(args) if args.sweep and not args.smoke else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "checks": checks, "rows": rows, "sweep": swept}, f, indent=1)


if __name__ == "__main__":
    main()
