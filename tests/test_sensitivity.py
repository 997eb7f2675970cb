"""Leave-one-in sensitivity and the `--fallback` search (rewriter/validate/sensitivity.py).

A site's sensitivity is the model's drift with only that site rewritten: measured on one gated
session, it must equal rewriting that site alone (`--sites`). The fallback orders by it, so a site
that cannot move the output (the last block's grid tokens, under a CLS classifier) stays rewritten
however large its local drift; and the kept set is greedy-maximal: no reverted site can be added back
alone within the budget. The gates leave no trace in the written model.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from attnrewrite.cli import main
from tests import onnx_builders as B
from tests.conftest import ort_run


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


@pytest.fixture
def vit(tmp_path):
    path = tmp_path / "vit.onnx"
    onnx.save(B.tiny_vit(depth=4), path)
    return path


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((6, 3, 16, 16)).astype(np.float32))
    return path


def test_sensitivity_equals_rewriting_that_site_alone(capsys, vit, calib, tmp_path):
    rc, doc, err = run(capsys, vit, "--pass", "window:size=2x2", "--calib", calib, "-o", tmp_path / "s.onnx",
                       "--sensitivity", "--json")
    assert rc == 0, err
    sites = doc["passes"][0]["sites"]
    assert all(s["sensitivity"] for s in sites)
    for s in sites:
        rc, alone, err = run(capsys, vit, "--pass", "window:size=2x2", "--calib", calib, "-o", tmp_path / f"{s['id']}.onnx",
                             "--sites", s["id"], "--json")
        assert rc == 0, err
        model = alone["passes"][0]["metrics_vs_original"]["logits"]
        assert abs(model["cosine"] - s["sensitivity"]["cosine"]) < 1e-6, (s["id"], model, s["sensitivity"])
        assert abs(model["rel_l2"] - s["sensitivity"]["rel_l2"]) < 1e-5


def test_gates_leave_no_trace(capsys, vit, calib, tmp_path):
    """With --sensitivity the written model is the same model: same inputs, same outputs."""
    paths = [tmp_path / "plain.onnx", tmp_path / "measured.onnx"]
    for path, extra in zip(paths, ([], ["--sensitivity"])):
        rc, _, err = run(capsys, vit, "--pass", "neighborhood:kernel=3", "--calib", calib, "-o", path, "--json", *extra)
        assert rc == 0, err
    protos = [onnx.load(p) for p in paths]
    assert [i.name for i in protos[1].graph.input] == [i.name for i in onnx.load(vit).graph.input]
    assert not any(n.op_type == "Where" and "gate" in n.name for n in protos[1].graph.node)
    x = np.load(calib)["x"]
    a, b = (ort_run(p, {"x": x})["logits"] for p in paths)
    assert np.array_equal(a, b)


def test_fallback_keeps_the_site_that_cannot_move_the_output(capsys, vit, calib, tmp_path):
    """The last block's grid tokens never reach the CLS logits: rewriting that site alone leaves the
    output unchanged, so the fallback never spends a revert on it, whatever its local drift."""
    rc, doc, err = run(capsys, vit, "--pass", "window:size=2x2", "--calib", calib, "-o", tmp_path / "f.onnx",
                       "--budget", "cosine>=0.9999", "--fallback", "--json")
    assert rc == 0, err
    p = doc["passes"][0]
    last = p["sites"][-1]
    assert last["sensitivity"]["cosine"] > 1 - 1e-6 and last["status"] == "rewritten", last
    assert p["kept_original"], "the budget needs some sites reverted"
    assert p["metrics_vs_original"]["logits"]["cosine"] >= 0.9999
    reverted = [s for s in p["sites"] if s["status"] == "reverted"]
    assert all("rewritten alone, the model's cosine moves to" in s["reason"] for s in reverted)


def test_fallback_result_is_greedy_maximal(capsys, vit, calib, tmp_path):
    """No reverted site fits back alone: adding it to the kept rewrites breaks the budget."""
    budget = "cosine>=0.98"
    rc, doc, err = run(capsys, vit, "--pass", "neighborhood:kernel=3", "--calib", calib, "-o", tmp_path / "g.onnx",
                       "--budget", budget, "--fallback", "--json")
    p = doc["passes"][0]
    assert p["kept_original"] and p["rewritten"], p["sites"]
    for site in p["kept_original"]:
        chosen = ",".join([*p["rewritten"], site])
        rc, more, err = run(capsys, vit, "--pass", "neighborhood:kernel=3", "--calib", calib, "-o", tmp_path / "m.onnx",
                            "--force",
                            "--sites", chosen, "--budget", budget, "--json")
        assert rc == 1, (site, more["passes"][0]["metrics_vs_original"])


def test_local_order_reverts_by_local_drift_without_extra_runs(capsys, vit, calib, tmp_path):
    """`--fallback-order local` (the old order) spends reverts on the largest local drift first, even on
    the site that cannot move the output; the default order keeps at least as many sites."""
    counts = {}
    for order in ("local", "sensitivity"):
        rc, doc, err = run(capsys, vit, "--pass", "window:size=2x2", "--calib", calib, "-o", tmp_path / f"{order}.onnx",
                           "--budget", "cosine>=0.9999", "--fallback", "--fallback-order", order, "--json")
        assert rc == 0, err
        p = doc["passes"][0]
        counts[order] = len(p["rewritten"])
        if order == "local":
            assert all(s["sensitivity"] is None for s in p["sites"])
            assert all("--fallback-order local" in s["reason"] for s in p["sites"] if s["status"] == "reverted")
    assert counts["sensitivity"] >= counts["local"]
