"""Digest of every pass's output on two real models: a refactor must leave these bytes unchanged.

    python benchmarks/rewrite_digest.py --out bench-out/digest > before.txt
    ... refactor ...
    python benchmarks/rewrite_digest.py --out bench-out/digest > after.txt && diff before.txt after.txt

Rewrites the digits ViT of `examples/digits_vit.py` (trained for one epoch: the weights only have to
be real, not good) and all-MiniLM-L6-v2 (real weights, 64 tokens) with every pass of
`benchmarks/accuracy.py`, through the CLI as a user would, and prints one line per model and pass:
the SHA-256 of the written model and the exit code. The trained and exported models are cached in
`--out`, so before/after runs rewrite the same inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks"), str(ROOT)]


def prepare(out: Path) -> dict[str, tuple[Path, Path, list[str]]]:
    """(model, calibration, passes) per model, built once and reused from `out`."""
    import accuracy

    digits_dir = out / "digits"
    if not (digits_dir / "digits_vit.onnx").exists():
        import digits_vit

        digits_vit.train_digits_vit(digits_dir, epochs=1)
    minilm = out / "minilm64.onnx"
    if minilm.exists():
        calib = out / "minilm_calib.npz"
    else:
        minilm, calib, _ = accuracy.export_minilm(out)
    return {
        "digits": (digits_dir / "digits_vit.onnx", digits_dir / "calib.npz", accuracy.DIGITS_PASSES),
        "minilm": (minilm, calib, accuracy.MINILM_PASSES),
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "-"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/digest", help="cache and output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (model, calib, passes) in prepare(out).items():
        for i, spec in enumerate(passes):
            target = out / f"{name}.{i}.onnx"
            proc = subprocess.run(
                [sys.executable, "-m", "attnrewrite", str(model), "--pass", spec, "--calib", str(calib),
                 "-o", str(target), "--force", "--json"], capture_output=True, text=True)
            print(f"{name:7s} {spec:45s} rc={proc.returncode} {digest(target)}", flush=True)


if __name__ == "__main__":
    main()
