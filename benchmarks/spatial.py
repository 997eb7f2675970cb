"""Spatial passes on a ViT-B/16 at 1024×1024 (64×64 grid + CLS), onnxruntime CPU, one process.

For each pass: end-to-end latency vs the original and vs the original after `sdpa:fuse=ort`
(ORT's fused attention), the theoretical FLOP-ratio bound, and per-site useful GFLOP/s next to a
plain MatMul's GFLOP/s measured in the same run. All models are timed interleaved so machine noise
hits them alike. Random weights (attention quality is not the point here; see `attnrewrite audit`).

The model is transformers' `ViTModel` exported by torch (`--model hf`, the default: eager attention,
TorchScript opset 17, `benchmarks/models.py hf_vit_b16_1024`), the graph users bring; `--model
synthetic` times the pure-ONNX timm-style graph of `attnrewrite.synthetic` for comparison.

    python benchmarks/spatial.py                 # transformers ViT-B/16 @ 1024 (several minutes on 2 cores)
    python benchmarks/spatial.py --model synthetic --depth 2 --img 512 --repeats 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir import tape as ir_tape
from rich.console import Console
from rich.table import Table

from attnrewrite.validate import bench as B
from attnrewrite.onnx.modelio import load_model, save_model
from attnrewrite.passes.spatial import emit as E
from attnrewrite.passes.ops import softmax_attention
from attnrewrite.validate.pipeline import apply_unvalidated
from attnrewrite.registry import parse_pass
from attnrewrite.synthetic import vit

PASSES = ["sdpa:fuse=ort", "window:size=16x16", "neighborhood:kernel=15", "window:size=8x8", "neighborhood:kernel=7",
          "neighborhood:kernel=7,dilation=2", "grid:size=8", "halo:block=8,halo=4"]


def _rules(spec, grid: int):
    """The pass's per-axis rules on a square grid (the same tables its emitter uses), or None (dense)."""
    o = spec.options
    if spec.name == "window":
        return E.rules_window((grid, grid), o["size"])
    if spec.name == "neighborhood":
        return E.rules_neighborhood((grid, grid), o["kernel"], o["dilation"])
    if spec.name == "grid":
        return E.rules_grid((grid, grid), o["size"])
    if spec.name == "halo":
        return E.rules_halo((grid, grid), o["block"], o["halo"])
    return None


def keys_per_query(spec_text: str, grid: int, prefix: int) -> float:
    """Average keys a grid query attends to (useful work), from the pass's own tables."""
    n = grid * grid
    rules = _rules(parse_pass(spec_text), grid)
    if rules is None:
        return prefix + n
    allowed = sum(len(ry) * len(rx) for ry in (rules[0].keys[y] for y in range(grid)) for rx in (rules[1].keys[x] for x in range(grid)))
    return prefix + allowed / n


def model_flops(depth: int, dim: int, heads: int, tokens: int, keys: float, prefix: int, mlp_ratio: int = 4) -> float:
    """Multiply-adds ×2 of one forward pass: projections and MLP are dense, attention scales with keys."""
    dense = depth * 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim)
    grid_q, full_q = tokens - prefix, prefix
    attention = depth * 2 * 2 * dim * (grid_q * keys + full_q * tokens)
    return dense + attention


def site_model(spec_text: str, heads: int, tokens: int, d: int, grid: int, prefix: int) -> onnx.ModelProto:
    """One attention site alone: inputs Q, K, V [1, h, N, d], the pass's subgraph, output O."""
    inputs = [ir.Value(name=n, shape=ir.Shape([1, heads, tokens, d]), type=ir.TensorType(ir.DataType.FLOAT)) for n in "qkv"]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": 17})
    t = ir_tape.Tape(graph)
    spec = parse_pass(spec_text if spec_text != "original" else "sdpa")
    scale = d ** -0.5
    rules = _rules(spec, grid)
    if rules is not None:
        out = E.emit_tiled(t, *inputs, scale=scale, bias=None, grid=(grid, grid), prefix=prefix, rule_y=rules[0],
                           rule_x=rules[1])
    else:
        out = softmax_attention(t, *inputs, scale, None)
    out.name = "o"
    graph.outputs.append(out)
    return ir.to_proto(ir.Model(graph, ir_version=10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--passes", nargs="*", default=PASSES)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--site-repeats", type=int, default=5)
    ap.add_argument("--model", choices=("hf", "synthetic"), default="hf",
                    help="hf: transformers ViTModel exported by torch; synthetic: attnrewrite.synthetic's ONNX graph")
    args = ap.parse_args()
    console = Console(stderr=True)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    grid, prefix, d = args.img // 16, 1, args.dim // args.heads
    tokens = prefix + grid * grid
    base = out / f"vit_d{args.depth}_{args.img}.onnx"
    if args.model == "hf":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from models import preset

        base = preset("hf_vit_b16_1024", out, depth=args.depth, dim=args.dim, heads=args.heads, img=args.img)
    elif not base.exists():
        console.print(f"building {base} ...")
        proto = vit(depth=args.depth, img=(args.img, args.img), patch=16, dim=args.dim, heads=args.heads, prefix=prefix,
                    classes=1000, mlp_ratio=4, dynamic_batch=False, sharpen=1.0)
        onnx.save(proto, base, save_as_external_data=True, all_tensors_to_one_file=True, location=base.name + ".data")
    paths = {"original": base}
    for spec_text in args.passes:
        path = out / f"{base.stem}.{spec_text.replace(':', '_').replace('=', '').replace(',', '_')}.onnx"
        # rewritten on every run: a cached rewrite would hide changes to the passes
        model = load_model(base)
        t0 = time.perf_counter()
        ids = apply_unvalidated(model, parse_pass(spec_text))
        save_model(model, path, force=True)
        console.print(f"{spec_text}: rewrote {len(ids)} sites in {time.perf_counter() - t0:.1f} s")
        paths[spec_text] = path
    name = "pixel_values" if args.model == "hf" else "x"
    feeds = {name: np.random.default_rng(0).standard_normal((1, 3, args.img, args.img)).astype(np.float32)}
    console.print(f"timing {len(paths)} models, {args.repeats} interleaved repeats ...")
    results = B.bench_models([str(p) for p in paths.values()], feeds, warmup=args.warmup, repeats=args.repeats,
                             threads=args.threads)
    by_name = dict(zip(paths, results))
    fused = by_name.get("sdpa:fuse=ort")
    orig_flops = model_flops(args.depth, args.dim, args.heads, tokens, tokens, prefix)
    threads = args.threads or os.cpu_count()
    mm = B.matmul_gflops(1024, 1024, 1024, threads)
    rows = []
    for name, res in by_name.items():
        keys = keys_per_query(name, grid, prefix) if name != "original" else tokens
        bound = orig_flops / model_flops(args.depth, args.dim, args.heads, tokens, keys, prefix)
        row = {"pass": name, "median_ms": res.median_ms, "speedup_vs_original": by_name["original"].median_ms / res.median_ms,
               "speedup_vs_fused": (fused.median_ms / res.median_ms) if fused else None, "flop_bound": bound}
        row["fraction_of_bound"] = row["speedup_vs_original"] / bound
        if name != "original":
            site = site_model(name, args.heads, tokens, d, grid, prefix)
            site_res = B.bench_models([site, site_model("original", args.heads, tokens, d, grid, prefix)],
                                      {n: np.random.default_rng(1).standard_normal((1, args.heads, tokens, d)).astype(np.float32) for n in "qkv"},
                                      warmup=1, repeats=args.site_repeats, threads=args.threads)
            useful = 2 * 2 * d * args.heads * ((tokens - prefix) * keys + prefix * tokens)
            row["site_ms"] = site_res[0].median_ms
            row["site_gflops"] = useful / site_res[0].median_ms / 1e6
        rows.append(row)
    dense_site = 2 * 2 * d * args.heads * tokens * tokens
    if args.json:
        print(json.dumps({"matmul_gflops": mm, "dense_site_flops": dense_site, "rows": rows}, indent=2))
        return
    which = "transformers ViTModel export" if args.model == "hf" else "synthetic ONNX graph"
    table = Table(title=f"ViT-B/16 @ {args.img} ({which}, {grid}x{grid}+{prefix} tokens, depth {args.depth}), ORT CPU {threads} threads; "
                        f"plain MatMul {mm:.1f} GFLOP/s")
    for col in ("pass", "median ms", "vs original", "vs fused", "FLOP bound", "of bound", "site ms", "site GFLOP/s", "of MatMul"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["pass"], f"{r['median_ms']:.0f}", f"{r['speedup_vs_original']:.2f}x",
                      f"{r['speedup_vs_fused']:.2f}x" if r["speedup_vs_fused"] else "-", f"{r['flop_bound']:.2f}x",
                      f"{r['fraction_of_bound']:.0%}", f"{r.get('site_ms', 0):.1f}" if "site_ms" in r else "-",
                      f"{r['site_gflops']:.1f}" if "site_gflops" in r else "-",
                      f"{r['site_gflops'] / mm:.0%}" if "site_gflops" in r else "-")
    Console(width=None if os.isatty(1) else 200).print(table)


if __name__ == "__main__":
    main()
