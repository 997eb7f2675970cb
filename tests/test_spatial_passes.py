"""Spatial passes through the CLI on torch-free ViTs: anchors, selection, reasons, validity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests import onnx_builders as B
from tests.conftest import ort_run
from tests.test_cli_pipeline import run


@pytest.fixture
def vit(tmp_path):
    path = tmp_path / "vit.onnx"
    onnx.save(B.tiny_vit(depth=4, img=(20, 24), prefix=2), path)  # 5x6 grid + 2 prefix tokens
    return path


def _rewrite(capsys, vit, tmp_path, spec, *extra):
    out = tmp_path / "o.onnx"
    rc, stdout, err = run(capsys, vit, "--pass", spec, "-o", out, "--force", "--json", *extra)
    assert rc == 0, err
    doc = json.loads(stdout)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    return doc["passes"][0]


@pytest.mark.parametrize("spec", [
    "window:size=5x6", "neighborhood:kernel=5x6", "neighborhood:kernel=9x11", "halo:block=6,halo=0", "halo:block=2,halo=6", "grid:size=5x6",
    "window:size=5x6,prefix=global",
])
def test_anchors_reproduce_the_model(capsys, vit, tmp_path, spec):
    p = _rewrite(capsys, vit, tmp_path, spec)
    assert len(p["rewritten"]) == 4
    assert p["metrics_vs_original"]["logits"]["max_abs"] <= 1e-5, p["metrics_vs_original"]


@pytest.mark.parametrize("spec", [
    "window:size=2x3,shift=alternate", "neighborhood:kernel=3,dilation=1x2", "grid:size=2x3",
    "halo:block=2,halo=1", "halo:block=2,halo=1,border=zero", "window:size=3,prefix=local",
])
def test_lossy_passes_rewrite_and_report_drift(capsys, vit, tmp_path, spec):
    p = _rewrite(capsys, vit, tmp_path, spec)
    assert len(p["rewritten"]) == 4
    m = p["metrics_vs_original"]["logits"]
    assert m["max_abs"] > 1e-4  # sharpened attention: sparsity must show
    assert all(s["local"]["rel_l2"] > 0 for s in p["sites"])


def test_keep_global_and_sites(capsys, vit, tmp_path):
    p = _rewrite(capsys, vit, tmp_path, "window:size=2,keep_global=every:2")
    status = {s["id"]: (s["status"], s["reason"]) for s in p["sites"]}
    assert status["attn_1"][0] == "skipped" and "keep_global" in status["attn_1"][1]
    assert status["attn_0"][0] == "rewritten" and status["attn_2"][0] == "rewritten"
    p = _rewrite(capsys, vit, tmp_path, "neighborhood:kernel=3", "--sites", "1-2")
    assert p["rewritten"] == ["attn_1", "attn_2"]


def test_too_large_window_is_declined_with_reason(capsys, vit, tmp_path):
    p = _rewrite(capsys, vit, tmp_path, "neighborhood:kernel=3,dilation=2")  # spans 6 rows of 5
    assert p["rewritten"] == [] and "larger than the 5x6 grid" in p["sites"][0]["reason"]
    p = _rewrite(capsys, vit, tmp_path, "grid:size=6")
    assert p["rewritten"] == [] and "larger than" in p["sites"][0]["reason"]


def test_no_grid_is_declined(capsys, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(B.plain_attention("none", n=6, project=True), path)
    out = tmp_path / "o.onnx"
    rc, stdout, err = run(capsys, path, "--pass", "grid:size=2", "-o", out, "--json")
    assert rc == 0, err
    site = json.loads(stdout)["passes"][0]["sites"][0]
    assert site["status"] == "skipped" and "grid" in site["reason"]


def test_text_sliding_window_uses_token_axis(capsys, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(B.plain_attention("input", n=10, project=True, self_attention=True), path)
    mask = np.zeros((4, 1, 1, 10), np.float32)
    mask[1::2, ..., 8:] = -1e9
    rng = np.random.default_rng(0)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=rng.standard_normal((4, 2, 10, 4)).astype(np.float32), mask=mask)
    for anchor in ("neighborhood:kernel=9", "neighborhood:kernel=10,global_tokens=0", "window:size=9",
                   "neighborhood:kernel=17"):  # 2·9−1 local tokens: covers all from any centre
        rc, stdout, err = run(capsys, path, "--pass", anchor, "--calib", calib, "-o", tmp_path / "o.onnx", "--json", "--force")
        assert rc == 0, err
        p = json.loads(stdout)["passes"][0]
        assert p["rewritten"] == ["attn_0"] and p["metrics_vs_original"]["y"]["max_abs"] <= 1e-5, anchor
    rc, stdout, err = run(capsys, path, "--pass", "window:size=4", "--calib", calib, "-o", tmp_path / "o2.onnx", "--json")
    assert rc == 0 and json.loads(stdout)["passes"][0]["metrics_vs_original"]["y"]["max_abs"] > 1e-3
    rc, stdout, err = run(capsys, path, "--pass", "neighborhood:kernel=3,dilation=2", "--calib", calib,
                          "-o", tmp_path / "o3.onnx", "--json")
    assert rc == 0 and json.loads(stdout)["passes"][0]["rewritten"] == ["attn_0"]
    rc, stdout, err = run(capsys, path, "--pass", "neighborhood:kernel=3,dilation=4", "--calib", calib,
                          "-o", tmp_path / "o4.onnx", "--json")
    assert rc == 0 and "longer than the 9 local tokens" in json.loads(stdout)["passes"][0]["sites"][0]["reason"]
    rc, stdout, err = run(capsys, path, "--pass", "window:size=4,global_tokens=10", "--calib", calib,
                          "-o", tmp_path / "o5.onnx", "--json")
    assert rc == 0 and "leaves none of the 10 tokens" in json.loads(stdout)["passes"][0]["sites"][0]["reason"]


def test_global_tokens_keep_the_first_tokens_global(capsys, tmp_path):
    """The first token sees every key and every key-window sees it; window=1 leaves only itself + token 0."""
    from attnrewrite.passes.spatial import reference as R

    allowed = R.allowed_sliding_1d(10, 1, prefix=1, mode="block")
    assert allowed[0].all() and allowed[:, 0].all() and (allowed.sum(-1)[1:] == 2).all()
    path = tmp_path / "m.onnx"
    onnx.save(B.plain_attention("input", n=10, project=True, self_attention=True), path)
    outs = {}
    for n in (0, 1, 3):
        rc, stdout, err = run(capsys, path, "--pass", f"window:size=3,global_tokens={n}", "-o", tmp_path / f"g{n}.onnx",
                              "--json", "--samples", "4")
        assert rc == 0, err
        outs[n] = json.loads(stdout)["passes"][0]["metrics_vs_original"]["y"]["rel_l2"]
    assert len(set(outs.values())) == 3  # the setting changes the rewrite


def test_passes_chain_sdpa_then_window(capsys, vit, tmp_path):
    out = tmp_path / "o.onnx"
    rc, stdout, err = run(capsys, vit, "--pass", "sdpa", "--pass", "window:size=5x6", "-o", out, "--json")
    assert rc == 0, err
    doc = json.loads(stdout)
    assert [p["pass"] for p in doc["passes"]] == ["sdpa", "window"]
    assert all(p["metrics_vs_original"]["logits"]["max_abs"] <= 1e-5 for p in doc["passes"])
    # the file holds the last pass's rewrite of every site (window replaced sdpa's), and runs like the original
    model = onnx.load(out)
    labels = {p.value for n in model.graph.node for p in n.metadata_props if p.key == "attnrewrite.pass"}
    assert labels == {"window[size=5x6]"}, labels
    x = np.random.default_rng(0).standard_normal((2, 3, 20, 24)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"x": x})["logits"], ort_run(vit, {"x": x})["logits"], atol=1e-5)


def test_symbolic_head_dim_is_declined_not_crashed(vit):
    import onnx_ir as ir

    from attnrewrite.onnx.analysis import analyze
    from attnrewrite.passes.spatial.common import spatial_frame

    site = analyze(vit).sites[0]
    assert spatial_frame(site, {}, allow_1d=False)[0] is None
    site.v.shape = ir.Shape([*list(site.v.shape)[:3], "dv"])
    reason, _, _ = spatial_frame(site, {}, allow_1d=False)
    assert reason and "head dimension of V" in reason
