"""`linear:phi=fitted`: Hedgehog feature maps fitted per site and head (passes/linear_fit.py).

The ONNX emission equals the numpy reference for given maps; fitting beats elu+1 on held-out samples of
peaked (low-entropy) attention, is deterministic for a seed, refuses too little data in one sentence,
and a diverged fit keeps the site's softmax attention instead of writing NaN constants. The numpy
optimiser (used without torch) has the gradient written out: it must equal torch's autograd, and both
backends must take the same steps.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from attnrewrite.passes import linear as L
from attnrewrite.passes import linear_fit as F
from attnrewrite.registry import parse_pass
from attnrewrite.synthetic import lone_site
from tests.conftest import ort_run
from tests.test_cli_pipeline import run as _run

pytest.importorskip("torch")

SCALE = 0.25


def _peaked(samples=16, heads=2, n=48, d=16, seed=0):
    """Q/K with a shared low-rank structure, so softmax rows are peaked (what elu+1 fails to mimic)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((heads, 4, d))
    q = np.einsum("shnr,hrd->shnd", rng.standard_normal((samples, heads, n, 4)), basis) + 0.3 * rng.standard_normal((samples, heads, n, d))
    k = np.einsum("shnr,hrd->shnd", rng.standard_normal((samples, heads, n, 4)), basis) + 0.3 * rng.standard_normal((samples, heads, n, d))
    v = rng.standard_normal((samples, heads, n, d))
    logits = SCALE * q @ np.swapaxes(k, -1, -2)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    y = (p / p.sum(-1, keepdims=True)) @ v
    return [x.astype(np.float32) for x in (q, k, v, y)]


def test_emission_equals_the_reference_for_given_maps():
    rng = np.random.default_rng(1)
    b, h, n, d, m = 2, 2, 20, 8, 6
    maps = F.FeatureMaps(*(rng.standard_normal(s).astype(np.float32) for s in ((h, d, m), (h, 1, m), (h, d, m), (h, 1, m))))
    graph, site = lone_site(b, h, n, d, scale=SCALE)
    plan = L.LinearPlan(parse_pass("linear:phi=fitted").options, maps=maps)
    out = L.LINEAR.rewrite(graph, site, plan)
    out.name = "out"
    graph.outputs.append(out)
    q, k, v = (rng.standard_normal((b, h, n, d)).astype(np.float32) for _ in range(3))
    got = ort_run(ir.Model(graph, ir_version=10), {"q": q, "k": k, "v": v})["out"]
    want = L.linear_reference(q, k, v, scale=SCALE, phi="fitted", eps=1e-6, maps=maps)
    assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("objective", ["attn", "output"])
def test_fitting_beats_elu1_on_held_out_samples(objective):
    q, k, v, y = _peaked()
    result = F.fit_feature_maps(q, k, v, y, scale=SCALE, dim=16, steps=150, objective=objective, seed=0)
    assert result.failure is None and result.backend == "torch"
    assert all(a > b for a, b in zip(result.cosine_after, result.cosine_before)), result
    if objective == "attn":
        assert all(a < b for a, b in zip(result.kl_after, result.kl_before)), result


@pytest.mark.parametrize("objective", ["attn", "output"])
@pytest.mark.parametrize("padded", [False, True])
def test_numpy_gradient_equals_torch_autograd(objective, padded):
    import torch

    q, k, v, y = _peaked(samples=3, n=20)
    weight = None
    if padded:  # a padding bias: the last 5 keys weigh 0, one key a little less
        weight = np.ones((3, 1, 20, 1), np.float32)
        weight[:, :, 15:] = 0.0
        weight[:, :, 3] = 0.5
    problem = F.make_problem(q, k, v, y, slice(0, 3), np.arange(2, 20), scale=SCALE, key_weight=weight,
                             objective=objective, samples=3)
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(s).astype(np.float32) for s in ((2, 16, 6), (2, 1, 6), (2, 16, 6), (2, 1, 6))]
    loss, grads = F.loss_and_grads(problem, params)
    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    want = F.torch_loss(problem, tensors, torch)
    want.backward()
    assert abs(loss - want.item()) < 1e-5 * max(1.0, abs(loss))
    for got, t in zip(grads, tensors):
        ref = t.grad.numpy()
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (objective, padded, err)


def test_numpy_and_torch_backends_take_the_same_steps():
    q, k, v, y = _peaked(samples=4)
    runs = [F.fit_feature_maps(q, k, v, y, scale=SCALE, dim=8, steps=40, objective="attn", seed=2, backend=b)
            for b in ("numpy", "torch")]
    assert [r.backend for r in runs] == ["numpy", "torch"]
    for a, b in zip(F.dataclasses.astuple(runs[0].maps), F.dataclasses.astuple(runs[1].maps)):
        assert np.abs(a - b).max() < 1e-3
    assert np.allclose(runs[0].cosine_after, runs[1].cosine_after, atol=2e-3)


def test_fit_is_deterministic_for_a_seed():
    q, k, v, y = _peaked(samples=4)
    a, b, c = (F.fit_feature_maps(q, k, v, y, scale=SCALE, dim=8, steps=20, objective="attn", seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.maps.wq, b.maps.wq) and not np.array_equal(a.maps.wq, c.maps.wq)


def test_too_few_rows_for_dim_is_one_sentence():
    q, k, v, y = _peaked(samples=1, n=8)
    with pytest.raises(F.InputError, match="needs at least 128 calibration query rows"):
        F.fit_feature_maps(q, k, v, y, scale=SCALE, dim=64, steps=1, objective="attn", seed=0)


def test_a_diverged_fit_reports_failure_instead_of_nan_weights():
    q, k, v, y = _peaked(samples=2)
    q[0, 0, 0, :] = 3e38  # finite, but x·W overflows to inf: the loss turns NaN on the first step
    result = F.fit_feature_maps(q, k, v, y, scale=SCALE, dim=8, steps=3, objective="output", seed=0)
    assert result.maps is None and "non-finite" in result.failure


def test_numpy_backend_beats_elu1_on_held_out_samples():
    q, k, v, y = _peaked()
    result = F.fit_feature_maps(q, k, v, y, scale=SCALE, dim=16, steps=150, objective="attn", seed=0, backend="numpy")
    assert result.backend == "numpy"
    assert all(a > b for a, b in zip(result.cosine_after, result.cosine_before)), result


def test_held_out_split_keeps_a_quarter():
    assert F.split(8) == (slice(0, 6), slice(6, 8))
    assert F.split(1) == (slice(0, 1), slice(0, 1))


def test_cli_reports_held_out_fit_per_head_and_beats_elu1(capsys, tmp_path, vit32):
    model, calib = vit32
    rc, out, err = _run(capsys, model, "--pass", "linear:phi=fitted,dim=16,steps=150", "--calib", calib,
                        "-o", tmp_path / "f.onnx", "--json")
    assert rc == 0, err
    p = json.loads(out)["passes"][0]
    for site in p["sites"]:
        plan = site["plan"]
        assert plan["fitted with"] == "torch" and len(plan["held-out output cosine after"]) == 2
    rc, out, _ = _run(capsys, model, "--pass", "linear", "--calib", calib, "-o", tmp_path / "e.onnx", "--json")
    elu = json.loads(out)["passes"][0]["metrics_vs_original"]["logits"]["cosine"]
    assert p["metrics_vs_original"]["logits"]["cosine"] > elu


def test_cli_fits_with_numpy_when_torch_is_not_installed(tmp_path, vit32):
    """torch is an optional extra: block its import; the report says the numpy optimiser ran."""
    model, calib = vit32
    script = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from attnrewrite.cli import main\n"
        f"rc = main([{str(model)!r}, '--pass', 'linear:phi=fitted,dim=8,steps=30', '--calib', {str(calib)!r}, "
        f"'-o', {str(tmp_path / 'n.onnx')!r}, '--json'])\n"
        "assert rc == 0, rc\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    sites = json.loads(proc.stdout)["passes"][0]["sites"]
    assert sites and all(s["plan"]["fitted with"] == "numpy" for s in sites)


def test_cli_refuses_fitting_on_random_inputs(capsys, tmp_path, vit32):
    model, _ = vit32
    rc, _, err = _run(capsys, model, "--pass", "linear:phi=fitted", "-o", tmp_path / "x.onnx")
    assert rc == 2 and "--calib" in err


def test_cli_keeps_softmax_where_the_fit_diverged(capsys, tmp_path, vit32, monkeypatch):
    model, calib = vit32
    diverged = F.FitResult(None, "torch", [], [], [], [], failure="the fit diverged (non-finite loss)")
    monkeypatch.setattr(L, "fit_feature_maps", lambda *a, **kw: diverged)
    rc, out, err = _run(capsys, model, "--pass", "linear:phi=fitted,dim=8,steps=1", "--calib", calib,
                        "-o", tmp_path / "d.onnx", "--json")
    assert rc == 0, err
    sites = json.loads(out)["passes"][0]["sites"]
    assert all(s["status"] == "skipped" and "diverged" in s["reason"] for s in sites)
    proto = onnx.load(tmp_path / "d.onnx")
    assert all(np.isfinite(onnx.numpy_helper.to_array(t)).all() for t in proto.graph.initializer)


@pytest.mark.parametrize("spec", ["linear:phi=fitted,dim=4", "linear:local=2x2", "linear:fit=ridge"])
def test_non_finite_calibration_activations_keep_softmax_with_the_reason(spec):
    _, site = lone_site(2, 2, 17, 8, scale=0.3, grid=(4, 4), prefix=1)
    plan = L.LINEAR.applies(site, parse_pass(spec).options)
    assert isinstance(plan, L.LinearPlan), plan
    q, k, v = (np.random.default_rng(i).standard_normal((8, 2, 17, 8)).astype(np.float32) for i in range(3))
    k[3, 1, 5, 2] = np.nan
    reason = L.LINEAR.fit(site, {"q": q, "k": k, "v": v, "output": v.copy()}, plan)
    assert isinstance(reason, str) and "K" in reason and "not finite" in reason and "keeps its softmax" in reason
