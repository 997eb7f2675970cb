"""benchmarks/plans.py's head-to-head timing of auto against the best single-pass plan.

Timings are not asserted; which plans are timed, in both orders, and what is recorded and printed are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples")]


def _model(path: Path, matmuls: int) -> str:
    """x -> x·W repeated `matmuls` times: two models of the same signature and different cost."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.eye(64, dtype=np.float32).ravel())
    nodes, prev = [], "x"
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def _rows(tmp_path, auto_meets=True):
    return [{"model": "m", "plan": "original", "e2e_ms": 1.0, "speedup": 1.0, "sites": "-"},
            {"model": "m", "plan": "window:size=4x4 --fallback", "path": _model(tmp_path / "a.onnx", 40),
             "meets_budget": True, "best_single": True, "sites": "2/2", "speedup": 1.5},
            {"model": "m", "plan": "auto", "path": _model(tmp_path / "b.onnx", 2), "meets_budget": auto_meets,
             "sites": "2/2", "speedup": 1.6}]


def test_duel_times_auto_against_the_best_single_pass_in_both_orders(tmp_path, monkeypatch, capsys):
    import plans

    calls = []
    real = plans.B.bench_models
    monkeypatch.setattr(plans.B, "bench_models", lambda paths, *a, **k: calls.append(list(paths)) or real(paths, *a, **k))
    rows = _rows(tmp_path)
    plans.duel(rows, {"x": np.ones((1, 64), np.float32)}, 4)
    best, auto = rows[1]["path"], rows[2]["path"]
    assert calls == [[best, auto], [auto, best]]
    d = rows[2]["duel"]
    assert d["best_single"] == "window:size=4x4 --fallback" and d["repeats"] == 8
    assert d["auto_vs_best_single"] == pytest.approx(d["best_single_ms"] / d["auto_ms"])
    plans.MODELS["m"] = {"budget": "cosine>=0.99"}
    try:
        plans.print_table(rows)
    finally:
        del plans.MODELS["m"]
    assert "auto against `window:size=4x4 --fallback` head to head (8 interleaved repeats" in capsys.readouterr().out


def test_duel_skips_a_plan_that_missed_the_budget(tmp_path):
    import plans

    rows = _rows(tmp_path, auto_meets=False)
    plans.duel(rows, {"x": np.ones((1, 64), np.float32)}, 2)
    assert "duel" not in rows[2]


def test_duel_repeats_follow_the_model_unless_given():
    import plans

    assert plans.duel_repeats_for("digits32", None) == plans.DUEL_REPEATS
    assert plans.duel_repeats_for("vitb", None) == 10  # a 1024² inference takes seconds
    assert plans.duel_repeats_for("vitb", 0) == 0 and plans.duel_repeats_for("digits", 7) == 7


def test_prose_passages_are_full_length_and_held_out_by_topic():
    from accuracy import PASSAGE_CALIB, PASSAGE_HELD, prose_passages

    words: dict[str, int] = {}
    calib, held = prose_passages(lambda text: [words.setdefault(w, len(words)) for w in text.split()], 200)
    assert len(calib) == PASSAGE_CALIB and len(held) == PASSAGE_HELD
    assert all(len(ids) == 200 for _, ids in calib + held)
    assert not {topic for topic, _ in calib} & {topic for topic, _ in held}
    assert len({tuple(ids) for _, ids in calib + held}) == len(calib) + len(held)


def test_rerun_auto_replaces_only_the_auto_row_and_times_it(tmp_path, monkeypatch):
    import plans

    rows = _rows(tmp_path)
    rows[2]["predicted_drift"] = 0.5
    single = dict(rows[1])
    fresh = {"model": "m", "plan": "auto", "path": _model(tmp_path / "c.onnx", 1), "meets_budget": True,
             "sites": "2/2", "predicted_drift": 0.004}
    paths = (Path(rows[1]["path"]), tmp_path / "calib.npz", tmp_path / "held.npz")
    np.savez(paths[2], x=np.ones((3, 64), np.float32))
    planned = []
    monkeypatch.setitem(plans.MODELS, "m", {"budget": "cosine>=0.99", "passes": ["window:size=4x4"]})
    monkeypatch.setattr(plans, "prepare", lambda name, folder: paths)
    monkeypatch.setattr(plans, "plan_row", lambda name, cfg, p, target, label, spec: planned.append(
        (target, spec)) or dict(fresh))
    plans.rerun_auto(rows, tmp_path, repeats=2, duel_repeats=2)
    assert planned == [(tmp_path / "b.onnx", "auto:candidates=window:size=4x4")]  # the old plan's file, rewritten
    assert rows[1] == single and rows[2]["predicted_drift"] == 0.004
    assert rows[2]["speedup"] > 0 and rows[2]["duel"]["repeats"] == 4
