"""How long `attnrewrite inspect` takes on a ViT-L/16 (1.2 GB of weights in external data), and how much
memory it needs compared with the model's size.

    python benchmarks/inspect_vitl.py                  # builds bench-out/vit_l16_224.onnx once (~25 s, ~5 GB RAM)
    python benchmarks/inspect_vitl.py --runs 5 --no-verify
    python benchmarks/inspect_vitl.py --model path/to/other.onnx

Each run is `attnrewrite inspect MODEL --json` in a fresh process, exactly as a user would run it, so the
wall time includes Python start-up and imports. Peak memory is the child's own `ru_maxrss` as returned by
`wait4` for that child alone (not the cumulative RUSAGE_CHILDREN of this process). Inspecting should
memory-map the external weights rather than read them, so the peak should stay well below the model size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import BENCH_OUT, model_bytes, preset  # noqa: E402


def attnrewrite_command() -> list[str]:
    """`python -m attnrewrite` with this interpreter: the same code whether or not the script is on PATH."""
    return [sys.executable, "-m", "attnrewrite"]


def timed_child(cmd: list[str]) -> tuple[float, int, int, str, str]:
    """(wall seconds, peak RSS bytes, exit code, stdout, stderr) of one child process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen so it won't wait again
        out.seek(0)
        err.seek(0)
        return seconds, usage.ru_maxrss * 1024, proc.returncode, out.read(), err.read()


def run(model: Path, runs: int, verify: bool) -> dict:
    """Time `inspect --json` `runs` times; raises SystemExit with the CLI's message if it fails."""
    cmd = [*attnrewrite_command(), "inspect", str(model), "--json", *([] if verify else ["--no-verify"])]
    walls, peaks, document = [], [], None
    for _ in range(runs):
        seconds, peak, rc, stdout, stderr = timed_child(cmd)
        if rc != 0:
            raise SystemExit(f"`{' '.join(cmd[2:])}` exited {rc}: {stderr.strip() or stdout.strip()[:500]}")
        walls.append(seconds)
        peaks.append(peak)
        document = json.loads(stdout)
    size = model_bytes(model)
    return {
        "model": str(model), "model_bytes": size, "runs": runs, "verify": verify,
        "wall_s": walls, "min_s": min(walls), "median_s": statistics.median(walls),
        "peak_rss_bytes": max(peaks), "peak_over_model": max(peaks) / size,
        "sites": len(document["sites"]), "verified_sites": sum(bool(s.get("verified")) for s in document["sites"]),
    }


def print_table(r: dict) -> None:
    table = Table(title=f"attnrewrite inspect {Path(r['model']).name} --json ({r['runs']} runs"
                        f"{'' if r['verify'] else ', --no-verify'})")
    for col in ("model size", "min wall", "median wall", "peak RSS", "peak / model size", "sites (verified)"):
        table.add_column(col, justify="right")
    table.add_row(f"{r['model_bytes'] / 1e6:.0f} MB", f"{r['min_s']:.2f} s", f"{r['median_s']:.2f} s",
                  f"{r['peak_rss_bytes'] / 1e6:.0f} MB", f"{r['peak_over_model']:.2f}",
                  f"{r['sites']} ({r['verified_sites']})")
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="inspect this model instead of the ViT-L/16 preset")
    ap.add_argument("--out", type=Path, default=BENCH_OUT, help="folder for the preset and results (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-verify", action="store_true", help="pass --no-verify to inspect")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the preset even if cached")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    model = args.model
    if model is None:
        start = time.perf_counter()
        # Built in a child: Linux keeps a process's RSS high-water mark across fork+exec, so building
        # the 1.2 GB model in this process would show up as the inspect children's "peak" memory.
        builder = [sys.executable, str(Path(__file__).resolve().parent / "models.py"), "vit_l16_224", "--out", str(args.out),
                   *(["--rebuild"] if args.rebuild else [])]
        subprocess.run(builder, check=True, stdout=subprocess.DEVNULL)
        model = preset("vit_l16_224", args.out)  # cached now: only resolves the path
        print(f"model: {model} ({model_bytes(model) / 1e6:.0f} MB, ready in {time.perf_counter() - start:.1f} s)")
    result = run(model, args.runs, verify=not args.no_verify)
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"inspect_{model.stem}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
