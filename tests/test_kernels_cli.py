"""`attnrewrite kernels` (list, check, ptx) and `benchmarks/gpu.py --smoke`.

Ahead-of-time compilation needs compiled triton, and this test process runs the interpreter
(tests/conftest.py), so `kernels ptx` runs in subprocesses with TRITON_INTERPRET removed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attnrewrite.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def compiled_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def test_kernels_lists_each_kernel_with_its_plugin(capsys):
    rc, out, err = run(capsys, "kernels", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert {k["plugin"] for k in doc["kernels"]} == {"WindowAttention", "NeighborhoodAttention", "BlockSparseAttention"}
    assert any("INT4" in n for n in doc["notes"])


needs_triton = pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) is None for m in ("torch", "triton")),
                                  reason="the kernels need torch and triton (pip install -e '.[gpu]')")


@needs_triton
def test_kernels_check_interpret_passes_and_reports_json(capsys):
    rc, out, err = run(capsys, "kernels", "check", "--interpret", "--dtype", "float32", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["ok"] and doc["device"] == "cpu" and len(doc["results"]) >= 10
    assert all(r["max_error"] <= r["tolerance"] for r in doc["results"])


@needs_triton
def test_kernels_check_exits_1_on_a_mismatch(capsys, monkeypatch):
    from attnrewrite.plugins import check

    monkeypatch.setitem(check.TOLERANCE, "float32", 1e-12)  # far below fp32 rounding: float cases must fail
    rc, out, err = run(capsys, "kernels", "check", "--interpret", "--dtype", "float32", "--json")
    assert rc == 1
    assert "exceed their tolerance" in err and not json.loads(out)["ok"]


@needs_triton
def test_kernels_check_refusals(capsys):
    rc, _, err = run(capsys, "kernels", "check", "--interpret", "--dtype", "bfloat16")
    assert rc == 2 and "bfloat16" in err
    proc = subprocess.run([sys.executable, "-m", "attnrewrite", "kernels", "check"], env=compiled_env(),
                          capture_output=True, text=True, timeout=300)
    import torch

    if not torch.cuda.is_available():
        assert proc.returncode == 2 and "--interpret" in proc.stderr


@needs_triton
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_ptx_compiles_every_variant(tmp_path, arch):
    out = tmp_path / "ptx"
    proc = subprocess.run([sys.executable, "-m", "attnrewrite", "kernels", "ptx", "--arch", arch, "-o", str(out),
                           "--dtype", "float16", "--json"], env=compiled_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    manifest = json.loads((out / f"manifest.{arch}.json").read_text())
    assert doc["payloads"] == manifest and len(manifest) == 13
    kernels = {m["kernel"] for m in manifest}
    assert {"window_attention_trt", "neighborhood_attention_trt", "block_sparse_prepare", "block_sparse_attention"} <= kernels
    for entry in manifest:
        ptx = (out / entry["file"]).read_text()
        assert f".target {arch}" in ptx and re.search(rf"\.entry {re.escape(entry['symbol'])}\b", ptx)
    trt = next(m for m in manifest if m["kernel"] == "window_attention_trt")
    # TensorRT's AOT argument order: inputs, int32 scalars, outputs
    assert trt["arguments"][:5] == ["q_ptr", "k_ptr", "v_ptr", "heads", "N"] and trt["arguments"][-1] == "o_ptr"


def test_kernels_ptx_refusals(capsys, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep")
    rc, _, err = run(capsys, "kernels", "ptx", "--arch", "sm_90", "-o", full)
    assert rc == 2 and "--force" in err and (full / "x").exists()
    if os.environ.get("TRITON_INTERPRET") == "1":
        rc, _, err = run(capsys, "kernels", "ptx", "--arch", "sm_90", "-o", tmp_path / "new")
        assert rc == 2 and "TRITON_INTERPRET" in err


@needs_triton
def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--no-check", "--json", str(out)],
                          env=compiled_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert {r["variant"].split()[0] for r in doc["rows"]} >= {"window", "neighborhood", "block-sparse"}
    for row in doc["rows"]:  # float32 in the interpreter: float variants exact, int8 within quantisation error
        assert row["max_error"] < (5e-2 if "int8" in row["variant"] else 1e-4), row
