"""Linear attention at 4097 tokens (transformers' ViT-B/16 @ 1024²): cost per site, end to end, and the
feature dimension's speed/accuracy curve.

    python benchmarks/linear_speed.py --site-only       # per-site table (a few minutes on 2 cores)
    python benchmarks/linear_speed.py                   # + end to end on the export (cached in bench-out)
    python benchmarks/linear_speed.py --site-only --accuracy bench-out/accuracy/accuracy_linear.json

Per site: Q/K/V [1, 12, 4097, 64] alone, the original (MatMul, Div by √d, Softmax, MatMul, as the export
writes it) against each variant's subgraph, timed interleaved in one process. Fitted maps are fitted on
random activations with a few steps: the cost of the rewritten site does not depend on the fitted
values, only on the feature dimension. End to end: the export rewritten through the CLI (fitted on one
real photo), timed interleaved with the original and ORT's fused attention (`sdpa:fuse=ort`).
`--accuracy` reads `benchmarks/accuracy.py --suite linear` rows and plots, per feature dimension, the
per-site speed-up here against the accuracy there (digits ViT top-1, MiniLM sentence cosine).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

from quant_speed import e2e_rows, photo_calibration, site_model  # noqa: E402

from attnrewrite.validate import bench as B  # noqa: E402

DIMS = (8, 16, 32, 64, 128)
SITE_PASSES = ["sdpa:fuse=ort", "linear", *(f"linear:phi=fitted,dim={m},steps=3" for m in DIMS),
               "window:size=8x8", "linear:local=8x8", "linear:phi=fitted,dim=32,steps=3,local=8x8",
               "window:size=16x16", "linear:local=16x16"]
E2E_PASSES = ["linear", "linear:phi=fitted,dim=16,steps=30", "linear:phi=fitted,dim=64,steps=30", "window:size=8x8",
              "linear:local=8x8"]


def activations(heads: int, tokens: int, d: int) -> dict[str, np.ndarray]:
    """Random Q/K/V and their softmax output (what `fit` reads), one head at a time to bound memory."""
    rng = np.random.default_rng(0)
    acts = {n: rng.standard_normal((1, heads, tokens, d)).astype(np.float32) for n in "qkv"}
    out = np.empty_like(acts["v"])
    for h in range(heads):
        logits = acts["q"][0, h] @ acts["k"][0, h].T / np.sqrt(d)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[0, h] = (p / p.sum(-1, keepdims=True)) @ acts["v"][0, h]
    acts["output"] = out
    return acts


def site_rows(heads: int, grid: int, d: int, repeats: int, console: Console) -> list[dict]:
    acts = activations(heads, 1 + grid * grid, d)
    console.print(f"building {len(SITE_PASSES) + 1} site models ...")
    models = [site_model(None, heads, grid, d, acts)] + [site_model(p, heads, grid, d, acts) for p in SITE_PASSES]
    feeds = {n: acts[n] for n in "qkv"}
    console.print(f"timing, {repeats} interleaved repeats ...")
    results = B.bench_models(models, feeds, warmup=1, repeats=repeats)
    base = results[0].median_ms
    return [{"pass": name, "site_ms": r.median_ms, "site_speedup": base / r.median_ms}
            for name, r in zip(["original", *SITE_PASSES], results)]


def dim_of(spec: str) -> int | None:
    m = re.search(r"phi=fitted,dim=(\d+)", spec)
    return int(m.group(1)) if m and "local=" not in spec else None


def plot_curve(rows: list[dict], accuracy: list[dict], path: Path) -> None:
    """Per-site speed-up at 4097 tokens (x) against accuracy on real weights (y), one point per feature
    dimension (elu+1 as the fixed-map reference), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = {dim_of(r["pass"]): r["site_speedup"] for r in rows if dim_of(r["pass"])}
    speed["elu1"] = next(r["site_speedup"] for r in rows if r["pass"] == "linear")
    panels = [("digits", "top1", "digits ViT held-out top-1"), ("minilm", "cosine", "MiniLM sentence cosine")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (model, key, label) in zip(axes, panels):
        points = []
        for r in accuracy:
            if r.get("model") != model or r.get(key) is None:
                continue
            dim = "elu1" if r["pass"] == "linear" else dim_of(r["pass"])
            if dim in speed and (dim == "elu1" or r["pass"] == f"linear:phi=fitted,dim={dim}"):
                points.append((speed[dim], r[key], dim))
        original = next((r[key] for r in accuracy if r.get("model") == model and r["pass"] == "original"), None)
        if original is not None:
            ax.axhline(original, color="grey", linestyle="--", label="original (softmax)")
        fitted = sorted(p for p in points if p[2] != "elu1")
        ax.plot([p[0] for p in fitted], [p[1] for p in fitted], "o-", label="phi=fitted")
        for x, y, dim in points:
            ax.annotate(f"dim {dim}" if dim != "elu1" else "elu+1", (x, y), textcoords="offset points", xytext=(4, 4))
        ax.plot([p[0] for p in points if p[2] == "elu1"], [p[1] for p in points if p[2] == "elu1"], "s", label="elu+1")
        ax.set_xlabel("site speed-up vs softmax at 4097 tokens (ORT CPU)")
        ax.set_ylabel(label)
        ax.legend(loc="lower left")
    fig.suptitle("linear attention: feature dimension, speed and accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--site-only", action="store_true")
    ap.add_argument("--rebuild", action="store_true", help="rewrite again even where bench-out has the rewritten model")
    ap.add_argument("--accuracy", type=Path, help="accuracy_linear.json of benchmarks/accuracy.py --suite linear")
    ap.add_argument("--plot", type=Path, help="where the curve goes (default: OUT/linear_dim_curve.png)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    rows = {r["pass"]: r for r in site_rows(12, 64, 64, args.repeats, console)}
    if not args.site_only:
        from models import preset

        model, calib = preset("hf_vit_b16_1024", args.out), photo_calibration(args.out / "astronaut_1024.npz", 1024)
        for r in e2e_rows(model, calib, args.out, max(1, args.repeats // 2), console, args.rebuild, E2E_PASSES):
            rows.setdefault(r["pass"], {"pass": r["pass"]}).update(r)
    table = Table(title="transformers ViT-B/16 @ 1024² (64×64 + CLS = 4097 tokens, 12 heads × 64), ORT CPU, "
                        "interleaved medians")
    for col in ("pass", "site ms", "site vs original", "e2e ms", "e2e vs original", "e2e vs sdpa:fuse=ort"):
        table.add_column(col)
    for r in rows.values():
        table.add_row(r["pass"], *(f"{r[k]:.0f}" if k.endswith("ms") and k in r else f"{r[k]:.2f}x" if k in r else "-"
                                   for k in ("site_ms", "site_speedup", "e2e_ms", "e2e_speedup", "vs_fused")))
    Console(width=200).print(table)
    (args.out / "linear_speed.json").write_text(json.dumps(list(rows.values()), indent=2))
    if args.accuracy:
        path = args.plot or args.out / "linear_dim_curve.png"
        plot_curve(list(rows.values()), json.loads(args.accuracy.read_text()), path)
        console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
