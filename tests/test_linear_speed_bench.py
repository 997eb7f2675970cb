"""benchmarks/linear_speed.py runs end to end on a small site and draws its speed/accuracy curve.

Timings are not asserted (the machines are noisy); that every variant builds, runs and is tabled is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks")]

pytest.importorskip("matplotlib")


def test_site_rows_cover_every_variant_and_the_curve_is_drawn(tmp_path):
    import linear_speed as S

    rows = S.site_rows(2, 16, 8, 1, Console(file=open("/dev/null", "w")))
    assert [r["pass"] for r in rows] == ["original", *S.SITE_PASSES]
    assert all(r["site_ms"] > 0 for r in rows)
    accuracy = [{"model": "digits", "pass": "original", "top1": 0.97},
                {"model": "digits", "pass": "linear", "top1": 0.1},
                *({"model": "digits", "pass": f"linear:phi=fitted,dim={m}", "top1": 0.8 + m / 1000} for m in (16, 32, 64)),
                {"model": "minilm", "pass": "linear:phi=fitted,dim=16", "cosine": 0.91}]
    path = tmp_path / "curve.png"
    S.plot_curve(rows, accuracy, path)
    assert path.stat().st_size > 10_000


def test_dim_of_reads_plain_fitted_specs_only():
    import linear_speed as S

    assert S.dim_of("linear:phi=fitted,dim=32,steps=3") == 32
    assert S.dim_of("linear:phi=fitted,dim=32,local=8x8") is None
    assert S.dim_of("linear") is None
