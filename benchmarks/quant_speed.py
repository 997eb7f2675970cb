"""Quantised and block-sparse attention on transformers' ViT-B/16 at 1024² (4097 tokens), ORT CPU.

    python benchmarks/quant_speed.py                    # export (cached), rewrite through the CLI, time
    python benchmarks/quant_speed.py --site-only        # per-site table only (a minute)

Per site: one attention site alone (Q, K, V [1, 12, 4097, 64] in, O out), written the way the export
writes it (MatMul, Div by √d, Softmax, MatMul) against each pass's subgraph, timed interleaved.
End to end: the export rewritten by `attnrewrite MODEL --pass P --calib photo.npz` (paro fits its block
tables on a real photo; the weights are random, so the tables are about speed, not accuracy), timed
interleaved with the original and with ORT's fused attention (`sdpa:fuse=ort`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

from attnrewrite.passes.ops import const  # noqa: E402
from attnrewrite.registry import parse_pass  # noqa: E402
from attnrewrite.synthetic import lone_site  # noqa: E402
from attnrewrite.validate import bench as B  # noqa: E402

PASSES = ["int8", "paro:density=0.25", "paro:density=0.25,bits=16", "paro:density=0.5", "paro:density=0.25,block=128"]


def flop_bound(spec: str, grid: int = 64, dim: int = 768, mlp_ratio: int = 4, *, with_prefix: bool = True) -> float:
    """Whole-model FLOP ratio original / rewritten: projections and MLP unchanged, attention scaled by the
    keys each query computes (paro: its kept blocks plus the CLS column; the CLS row stays dense).
    The ratio does not depend on depth (every block is the same)."""
    prefix = 1 if with_prefix else 0
    tokens = prefix + grid * grid
    keys = tokens
    if spec.startswith("paro"):
        opts = dict(item.split("=") for item in spec.split(":", 1)[1].split(","))
        block = int(opts.get("block", 64))
        nb = -(-grid * grid // block)
        keys = prefix + min(nb, max(1, round(float(opts.get("density", 0.25)) * nb))) * block
    dense = 2 * tokens * dim * (4 * dim + 2 * mlp_ratio * dim)

    def attention(k):
        return 2 * 2 * dim * ((tokens - prefix) * k + prefix * tokens)

    return (dense + attention(tokens)) / (dense + attention(keys))


def site_model(spec_text: str | None, heads: int, grid: int, d: int, acts: dict[str, np.ndarray]):
    """One site alone; `None` is the original as transformers' eager ViT exports it. `acts` (q, k, v,
    and `output` for passes that fit on it) are what a fitting pass fits on."""
    graph, site = lone_site(1, heads, 1 + grid * grid, d, scale=d ** -0.5, grid=(grid, grid), prefix=1)
    q, k, v = site.q, site.k, site.v
    t = ir_tape.Tape(graph)
    if spec_text is None:
        logits = t.op("MatMul", [q, t.op("Transpose", [k], attributes={"perm": [0, 1, 3, 2]})])
        probs = t.op("Softmax", [t.op("Div", [logits, const(t, d ** 0.5, np.float32)])], attributes={"axis": -1})
        out = t.op("MatMul", [probs, v])
    else:
        spec = parse_pass(spec_text)
        plan = spec.applies(site)
        if plan.needs_fit:
            plan = spec.impl.fit(site, acts, plan)
        out = spec.impl.rewrite(graph, site, plan)
    out.name = "o"
    graph.outputs.append(out)
    return ir.to_proto(ir.Model(graph, ir_version=10))


def site_rows(heads: int, grid: int, d: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    tokens = 1 + grid * grid
    acts = {n: rng.standard_normal((1, heads, tokens, d)).astype(np.float32) for n in "qkv"}
    models = [site_model(None, heads, grid, d, acts)] + [site_model(p, heads, grid, d, acts) for p in PASSES]
    results = B.bench_models(models, acts, warmup=1, repeats=repeats)
    base = results[0].median_ms
    return [{"pass": name, "site_ms": r.median_ms, "site_speedup": base / r.median_ms}
            for name, r in zip(["original", *PASSES], results)]


def photo_calibration(path: Path, img: int) -> Path:
    """One real photo (scikit-image's astronaut), resized to img², ImageNet-normalised."""
    from skimage import data, transform

    photo = transform.resize(data.astronaut(), (img, img), anti_aliasing=True).astype(np.float32)
    x = (photo - np.array([0.5, 0.5, 0.5], np.float32)) / np.array([0.5, 0.5, 0.5], np.float32)
    np.savez(path, pixel_values=x.transpose(2, 0, 1)[None])
    return path


def dit_model(out: Path) -> tuple[Path, Path]:
    """A diffusers-style DiT (no CLS, q/k-norm): 128² latents in 2×2 patches = 64×64 = 4096 tokens,
    B/2 width, 4 blocks; calibration: two seeded random latents (the weights are random too)."""
    from models import export_dit

    path = out / "dit_b2_4096.onnx"
    if not path.exists():
        export_dit(path, depth=4, dim=768, heads=12, latent=128, patch=2)
    calib = out / "dit_calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, latent=rng.standard_normal((2, 4, 128, 128)).astype(np.float32),
             timestep=np.array([0.3, 0.7], np.float32))
    return path, calib


def e2e_rows(model: Path, calib: Path, out: Path, repeats: int, console: Console, rebuild: bool = False,
             passes: list[str] = PASSES) -> list[dict]:
    paths = {"original": model}
    drift = {}
    for spec in ["sdpa:fuse=ort", *passes]:
        target = out / f"{model.stem}.{''.join(c if c.isalnum() else '_' for c in spec)}.onnx"
        if rebuild or not target.exists():  # a cached rewrite is reused: --rebuild after changing a pass
            console.print(f"rewriting with {spec} ...")
            proc = subprocess.run([sys.executable, "-m", "attnrewrite", model, "--pass", spec, "--calib", calib,
                                   "-o", target, "--json", "--force"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{spec}: {proc.stderr.strip()[-500:]}")
            metrics = json.loads(proc.stdout)["passes"][0]["metrics_vs_original"]
            drift[spec] = next(iter(metrics.values()))["cosine"]
        paths[spec] = target
    feeds = {k: v[:1] for k, v in np.load(calib).items()}
    console.print(f"timing {len(paths)} models, {repeats} interleaved repeats ...")
    results = dict(zip(paths, B.bench_models([str(p) for p in paths.values()], feeds, warmup=1, repeats=repeats)))
    base, fused = results["original"].median_ms, results["sdpa:fuse=ort"].median_ms
    return [{"pass": name, "e2e_ms": r.median_ms, "e2e_speedup": base / r.median_ms, "vs_fused": fused / r.median_ms,
             **({"cosine": drift[name]} if name in drift else {})} for name, r in results.items()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--site-only", action="store_true")
    ap.add_argument("--rebuild", action="store_true", help="rewrite again even where bench-out has the rewritten model")
    ap.add_argument("--model", choices=("hf_vit", "dit"), default="hf_vit",
                    help="hf_vit: transformers ViT-B/16 @ 1024²; dit: a diffusers-style DiT, 4096 tokens, 4 blocks")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    heads, grid, d = 12, 64, 64
    rows = {r["pass"]: r for r in site_rows(heads, grid, d, max(args.repeats, 5))} if args.model == "hf_vit" else {}
    if not args.site_only:
        from models import preset

        if args.model == "dit":
            model, calib = dit_model(args.out)
        else:
            model, calib = preset("hf_vit_b16_1024", args.out), photo_calibration(args.out / "astronaut_1024.npz", 1024)
        for r in e2e_rows(model, calib, args.out, args.repeats, console, args.rebuild):
            r["flop_bound"] = flop_bound(r["pass"], with_prefix=args.model == "hf_vit")
            rows.setdefault(r["pass"], {"pass": r["pass"]}).update(r)
    title = ("transformers ViT-B/16 @ 1024² (64×64 + CLS = 4097 tokens" if args.model == "hf_vit" else
             "diffusers-style DiT (64×64 = 4096 latent tokens, no CLS, 4 blocks")
    table = Table(title=f"{title}, random weights), ORT CPU, interleaved medians")
    for col in ("pass", "site ms", "site vs original", "e2e ms", "e2e vs original", "e2e vs sdpa:fuse=ort",
                "e2e FLOP bound", "output cosine (calib)"):
        table.add_column(col)
    for r in rows.values():
        table.add_row(r["pass"], *(f"{r[k]:.0f}" if k.endswith("ms") and k in r else f"{r[k]:.2f}x" if k in r else "-"
                                   for k in ("site_ms", "site_speedup", "e2e_ms", "e2e_speedup", "vs_fused", "flop_bound")),
                      f"{r['cosine']:.4f}" if "cosine" in r else "-")
    Console(width=200).print(table)
    (args.out / f"quant_speed_{args.model}.json").write_text(json.dumps(list(rows.values()), indent=2))


if __name__ == "__main__":
    main()
