"""PARO's density sweep: accuracy cost against attention speed-up, with and without token reordering.

    python benchmarks/accuracy.py --suite quant --only digits     # accuracy rows (bench-out/accuracy)
    python benchmarks/paro_sweep.py                               # + per-site timing → table and plot

Accuracy comes from the digits ViT rows of `accuracy.py --suite quant` (real trained weights,
held-out images): logit cosine vs the original per density, bit width and `reorder=auto|none`.
Speed is one attention site at the speed benchmark's shape (ViT-B/16 at 1024², Q/K/V
[1, 12, 4097, 64]) with the same pass options except the block (64 there: the digits' 64 grid tokens
use block 8), timed interleaved against the dense original. The order does not change the cost (the
same gathers run), so each density has one speed and two accuracy points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

from attnrewrite.validate import bench as B  # noqa: E402
from quant_speed import site_model  # noqa: E402

DENSITIES = (0.5, 0.25, 0.125)
BITS = (16, 8, 4)


def site_speedups(repeats: int) -> dict[tuple[float, int], float]:
    rng = np.random.default_rng(0)
    acts = {n: rng.standard_normal((1, 12, 4097, 64)).astype(np.float32) for n in "qkv"}
    keys = [(d, b) for d in DENSITIES for b in BITS]
    models = [site_model(None, 12, 64, 64, acts)] + [site_model(f"paro:density={d},bits={b}", 12, 64, 64, acts)
                                                     for d, b in keys]
    results = B.bench_models(models, acts, warmup=1, repeats=repeats)
    return {key: results[0].median_ms / r.median_ms for key, r in zip(keys, results[1:])}


def accuracy(rows: list[dict]) -> dict[tuple[float, int, str], float]:
    out = {}
    for r in rows:
        if r["model"] == "digits" and r["pass"].startswith("paro:") and r.get("cosine") is not None:
            opts = dict(item.split("=") for item in r["pass"][5:].split(","))
            out[(float(opts["density"]), int(opts["bits"]), opts["reorder"])] = r["cosine"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy", type=Path, default=ROOT / "bench-out" / "accuracy" / "accuracy_quant.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "paro_sweep.png")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    acc = accuracy(json.loads(args.accuracy.read_text()))
    speed = site_speedups(args.repeats)
    print("| density | bits | site speed-up | digits cosine, reorder=auto | digits cosine, reorder=none |")
    print("| --- | --- | --- | --- | --- |")
    for (d, b), s in speed.items():
        auto, none = acc.get((d, b, "auto")), acc.get((d, b, "none"))
        print(f"| {d} | {b} | {s:.2f}× | {auto if auto is None else f'{auto:.4f}'} | {none if none is None else f'{none:.4f}'} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for b, color in zip(BITS, ("tab:blue", "tab:orange", "tab:red")):
        for reorder, style in (("auto", "-o"), ("none", "--x")):
            pts = [(speed[(d, b)], 1 - acc[(d, b, reorder)]) for d in DENSITIES if (d, b, reorder) in acc]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, color=color, label=f"bits={b}, reorder={reorder}")
    for d in DENSITIES:
        if (d, 16, "auto") in acc:
            ax.annotate(f"density {d}", (speed[(d, 16)], 1 - acc[(d, 16, "auto")]), textcoords="offset points",
                        xytext=(0, -14), ha="center", fontsize=7)
    ax.set_xlabel("attention site speed-up vs dense fp32 (ViT-B/16 @ 1024², ORT CPU)")
    ax.set_ylabel("1 − logit cosine (digits ViT, held out)")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title("paro: density sweep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
