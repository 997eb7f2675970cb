"""`linear:local=...`: exact softmax on a local set plus linear attention outside it (LoLCATs window_tk).

The ONNX emission equals the numpy reference (`linear_hybrid.hybrid_reference`) on 2-D windows and
neighbourhoods with prefix tokens, on 1-D text with a padding mask, and with fitted maps; a local set
covering every key is softmax (the anchor), whatever γ; the mixing search recovers a planted γ; and
through the CLI the hybrid rewrites real exports, reports γ and held-out cosine per head, and beats
plain linear attention.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from attnrewrite.passes import linear as L
from attnrewrite.passes import linear_fit as F
from attnrewrite.passes import linear_hybrid as H
from attnrewrite.registry import parse_pass
from attnrewrite.synthetic import lone_site
from tests.conftest import ort_run
from tests.test_cli_pipeline import run as _run

SCALE = 0.3


def _softmax_attention(q, k, v, bias=None):
    logits = SCALE * q.astype(np.float64) @ np.swapaxes(k, -1, -2)
    if bias is not None:
        logits = logits + bias
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _emit(spec: str, *, grid=None, prefix=None, tokens, gamma, maps=None, bias=False, batch=2, heads=2, d=8):
    """The pass's plan and rewrite on a lone site; returns (ONNX output, reference output, softmax, plan)."""
    graph, site = lone_site(batch, heads, tokens, d, scale=SCALE, grid=grid, prefix=prefix,
                            bias_dims=[batch, 1, 1, tokens] if bias else None)
    plan = L.LINEAR.applies(site, parse_pass(spec).options)
    assert isinstance(plan, L.LinearPlan), plan
    plan = dataclasses.replace(plan, gamma=np.asarray(gamma, np.float32), maps=maps)
    out = L.LINEAR.rewrite(graph, site, plan)
    out.name = "out"
    graph.outputs.append(out)
    rng = np.random.default_rng(7)
    feeds = {x: rng.standard_normal((batch, heads, tokens, d)).astype(np.float32) for x in "qkv"}
    b = None
    if bias:  # the second sample pads its last three tokens
        b = np.zeros((batch, 1, 1, tokens), np.float32)
        b[1, ..., -3:] = -1e9
        feeds["bias"] = b
    got = ort_run(ir.Model(graph, ir_version=10), feeds)["out"]
    weight = L.key_weight_reference(b)
    fq, fk = L.features_reference(feeds["q"], feeds["k"], scale=SCALE, phi=plan.options["phi"], maps=maps, key_weight=weight)
    want = H.hybrid_reference(feeds["q"], feeds["k"], feeds["v"], scale=SCALE, allowed=plan.local.allowed(),
                              gamma=plan.gamma, fq=fq, fk=fk, bias=b)
    return got, want, _softmax_attention(feeds["q"], feeds["k"], feeds["v"], b), plan


@pytest.mark.parametrize("spec,grid", [
    ("linear:local=2x3", (4, 6)),
    ("linear:local=3,local_kind=neighborhood", (4, 6)),
    ("linear:phi=relu,local=4x2", (4, 6)),
    ("linear:local=5,global_tokens=1", None),
    ("linear:local=5,local_kind=window,global_tokens=1", None),
    ("linear:local=5,local_kind=neighborhood,global_tokens=2", None),
])
def test_emission_equals_the_reference(spec, grid):
    prefix = 1 if grid else None
    tokens = 1 + 24 if grid else 24
    got, want, soft, _ = _emit(spec, grid=grid, prefix=prefix, tokens=tokens, gamma=[0.2, 0.7], bias=grid is None)
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(got - soft).max() > 1e-2  # the linear part is really there


@pytest.mark.parametrize("spec,grid,kind", [("linear:local=5", None, "neighborhood"), ("linear:local=2x2", (4, 6), "window"),
                                            ("linear:local=5,local_kind=window", None, "window")])
def test_auto_local_kind_is_a_sliding_window_on_text_and_windows_on_a_grid(spec, grid, kind):
    _, _, _, plan = _emit(spec, grid=grid, prefix=1 if grid else None, tokens=25 if grid else 24, gamma=[0.2, 0.7],
                          bias=grid is None)
    assert plan.local.kind == kind
    if spec == "linear:local=5":  # a query mid-sequence sees the 5 tokens around it and the global CLS
        assert list(np.flatnonzero(plan.local.allowed()[12])) == [0, 10, 11, 12, 13, 14]


def test_emission_with_fitted_maps_equals_the_reference():
    rng = np.random.default_rng(1)
    maps = F.FeatureMaps(*(rng.standard_normal(s).astype(np.float32) for s in ((2, 8, 6), (2, 1, 6), (2, 8, 6), (2, 1, 6))))
    got, want, _, _ = _emit("linear:phi=fitted,local=2x2", grid=(4, 4), prefix=1, tokens=17, gamma=[0.5, 0.05], maps=maps)
    assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("spec,grid", [("linear:local=4x6", (4, 6)), ("linear:local=9,local_kind=neighborhood", (4, 6)),
                                       ("linear:local=99", None)])
@pytest.mark.parametrize("gamma", [[0.01, 0.99], [0.5, 0.5]])
def test_a_local_set_covering_every_key_is_softmax(spec, grid, gamma):
    """The anchor: no key outside the local set, so the hybrid is softmax attention for any γ > 0."""
    got, want, soft, plan = _emit(spec, grid=grid, prefix=1 if grid else None, tokens=25 if grid else 24,
                                  gamma=gamma, bias=grid is None)
    assert plan.local.allowed().all()
    assert np.abs(want - soft).max() < 1e-12
    assert np.abs(got - soft).max() < 1e-6


def test_mixing_search_recovers_a_planted_gamma():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((4, 3, 20, 8)) for _ in range(3))
    allowed = H.local_set("window", (2, 2), (4, 5), 0, 20).allowed()
    fq, fk = L.features_reference(q, k, scale=SCALE, phi="elu1")
    parts = H.hybrid_parts(q, k, v, scale=SCALE, allowed=allowed, fq=fq, fk=fk)
    planted = np.array([0.03, 0.4, 0.97])
    gamma = H.fit_mixing(parts, parts.mix(planted))
    assert np.abs(gamma - planted).max() < 0.01, gamma


@pytest.mark.parametrize("spec,reason", [
    ("linear:local=2x2x2", "does not fit"),
    ("linear:local=3x4,global_tokens=0", None),
])
def test_applies_says_why_not(spec, reason):
    _, site = lone_site(1, 2, 17, 8, scale=SCALE, grid=(4, 4), prefix=1)
    plan = L.LINEAR.applies(site, parse_pass(spec).options)
    if reason:
        assert isinstance(plan, str) and reason in plan
    else:
        assert plan.local.grid == (4, 4) and plan.local.prefix == 1 and plan.needs_calibration


def test_dynamic_token_count_is_declined_with_a_reason():
    _, site = lone_site(1, 2, 17, 8, scale=SCALE)
    site = dataclasses.replace(site, info=dataclasses.replace(site.info, q_len=None, kv_len=None))
    plan = L.LINEAR.applies(site, parse_pass("linear:local=4").options)
    assert isinstance(plan, str) and "dynamic" in plan


# --- through the CLI ------------------------------------------------------------------------------


def test_cli_hybrid_reports_gamma_and_beats_plain_linear(capsys, tmp_path, vit32):
    model, calib = vit32
    rc, out, err = _run(capsys, model, "--pass", "linear:local=2x2", "--calib", calib, "-o", tmp_path / "h.onnx", "--json")
    assert rc == 0, err
    p = json.loads(out)["passes"][0]
    assert len(p["rewritten"]) == 2
    for site in p["sites"]:
        plan = site["plan"]
        assert len(plan["mix γ (local weight)"]) == 2 and all(0 < g < 1 for g in plan["mix γ (local weight)"])
        after, before = plan["held-out output cosine, local+linear"], plan["held-out output cosine, local+linear at γ=0.1"]
        assert all(a >= b - 1e-4 for a, b in zip(after, before)), plan
    onnx.checker.check_model(onnx.load(tmp_path / "h.onnx"), full_check=True)
    rc, out, _ = _run(capsys, model, "--pass", "linear", "--calib", calib, "-o", tmp_path / "l.onnx", "--json")
    plain = json.loads(out)["passes"][0]["metrics_vs_original"]["logits"]["cosine"]
    assert p["metrics_vs_original"]["logits"]["cosine"] > plain


def test_cli_hybrid_needs_real_calibration(capsys, tmp_path, vit32):
    model, _ = vit32
    rc, _, err = _run(capsys, model, "--pass", "linear:local=2x2", "-o", tmp_path / "x.onnx")
    assert rc == 2 and "--calib" in err


def test_cli_hybrid_with_ridge_correction_keeps_prefix_rows_exact(capsys, tmp_path, vit32):
    model, calib = vit32
    rc, out, err = _run(capsys, model, "--pass", "linear:local=4x4,fit=ridge", "--calib", calib,
                        "-o", tmp_path / "r.onnx", "--json")
    assert rc == 0, err
    assert len(json.loads(out)["passes"][0]["rewritten"]) == 2


@pytest.mark.parametrize("name,exporter,spec", [("minilm", "torchscript17", "linear:local=4"),
                                                ("deit_tiny", "dynamo18", "linear:local=2x2,local_kind=neighborhood")])
def test_exports_take_the_hybrid(capsys, exported, tmp_path, name, exporter, spec):
    """On exporters' graphs (text with a padding mask, a ViT with CLS + distillation tokens)."""
    from attnrewrite.validate.calib import input_specs, load_calibration

    exp = exported(name, exporter)
    specs = input_specs(str(exp.path))
    batches = load_calibration(None, specs, {}, num_samples=8, seed=0).batches
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{n: np.concatenate([b[n] for b in batches]) for n in batches[0]})
    rc, out, err = _run(capsys, exp.path, "--pass", spec, "--calib", calib, "-o", tmp_path / "x.onnx", "--json")
    assert rc == 0, err
    p = json.loads(out)["passes"][0]
    assert len(p["rewritten"]) == len(exp.meta.sites), p["sites"]
    assert all(0 < s["local"]["cosine"] <= 1 + 1e-6 for s in p["sites"])


def test_joint_refinement_lowers_the_hybrids_output_error():
    """Maps and γ trained together on the hybrid's output (LoLCATs) beat the separately fitted pair on
    the rows they were fitted on."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((4, 2, 20, 8)).astype(np.float32) for _ in range(3))
    target = _softmax_attention(q, k, v).astype(np.float32)
    allowed = H.local_set("window", (2, 2), (4, 5), 0, 20).allowed()
    fitted = F.fit_feature_maps(q, k, v, target, scale=SCALE, dim=6, steps=30, objective="attn", seed=0)
    rows = np.arange(20)

    def mse(maps, gamma):
        fq, fk = L.features_reference(q, k, scale=SCALE, phi="fitted", maps=maps)
        out = H.hybrid_parts(q, k, v, scale=SCALE, allowed=allowed, fq=fq, fk=fk, rows=rows).mix(gamma)
        return float(((out - target) ** 2).mean())

    fq, fk = L.features_reference(q, k, scale=SCALE, phi="fitted", maps=fitted.maps)
    gamma = H.fit_mixing(H.hybrid_parts(q, k, v, scale=SCALE, allowed=allowed, fq=fq, fk=fk), target)
    maps, refined_gamma = H.refine_jointly(q, k, v, target, scale=SCALE, allowed=allowed, rows=rows, maps=fitted.maps,
                                           gamma=gamma, steps=60)
    assert mse(maps, refined_gamma) < 0.9 * mse(fitted.maps, gamma)


@pytest.mark.parametrize("joint,expected", [("true", "yes (torch, output MSE)"), ("false", "no")])
def test_cli_reports_whether_the_hybrid_was_refined_jointly(capsys, tmp_path, vit32, joint, expected):
    pytest.importorskip("torch")
    model, calib = vit32
    rc, out, err = _run(capsys, model, "--pass", f"linear:phi=fitted,dim=8,steps=20,local=2x2,joint={joint}",
                        "--calib", calib, "-o", tmp_path / "j.onnx", "--json")
    assert rc == 0, err
    assert all(s["plan"]["maps and γ refined jointly"] == expected for s in json.loads(out)["passes"][0]["sites"])
