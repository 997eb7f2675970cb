"""Video and hierarchical vision exports: 3-D grids, ViTDet/SAM interleaving, Hiera mask units, and
the guard that keeps a vision site without a grid from being rewritten as a 1-D text sequence."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the model fixtures need torch (pip install -e '.[torch]')")

from tests.test_cli_pipeline import run  # noqa: E402
from tests.test_detect_fixtures import _rewrite  # noqa: E402

EXPORTERS_SEEN = ["torchscript17", "dynamo18"]


def _sites(doc) -> dict[str, dict]:
    return {s["id"]: s for s in doc["sites"]}


@pytest.mark.parametrize("exporter", EXPORTERS_SEEN)
def test_video_grid_is_traced_and_shown(capsys, exported, exporter):
    exp = exported("hf_videomae", exporter)
    rc, stdout, err = run(capsys, "inspect", exp.path)
    assert rc == 0, err
    assert "4×4×6+0" in stdout  # F×H×W + prefix in the terminal table
    rc, stdout, _ = run(capsys, "inspect", exp.path, "--json")
    assert [s["grid"] for s in json.loads(stdout)["sites"]] == [[4, 4, 6], [4, 4, 6]]


@pytest.mark.parametrize("name", ["hf_videomae", "video_conv2d_frames"])
def test_3d_anchors_reproduce_the_video_model(capsys, exported, name, tmp_path):
    """A window covering F×H×W and a neighbourhood of 2·side−1 on every axis are full attention."""
    exp = exported(name, "torchscript17")
    grid = exp.meta.sites[0].grid
    for spec in (f"window:size={'x'.join(map(str, grid))}", f"neighborhood:kernel={'x'.join(str(2 * g - 1) for g in grid)}"):
        p, _ = _rewrite(capsys, exp.path, tmp_path, spec)
        assert p["rewritten"] == ["attn_0", "attn_1"], (spec, p["sites"])
        assert all(m["max_abs"] <= 1e-5 for m in p["metrics_vs_original"].values()), (spec, p["metrics_vs_original"])


@pytest.mark.parametrize("name", ["hf_videomae", "video_conv2d_frames"])
def test_3d_local_passes_rewrite_video_sites(capsys, exported, name, tmp_path):
    exp = exported(name, "torchscript17")
    for spec in ("neighborhood:kernel=3", "neighborhood:kernel=2x3x3,dilation=1x1x2", "window:size=2x2x3,shift=half"):
        p, _ = _rewrite(capsys, exp.path, tmp_path, spec)
        assert p["rewritten"] == ["attn_0", "attn_1"], (spec, p["sites"])
        drift = max(m["rel_l2"] for m in p["metrics_vs_original"].values())
        assert 1e-4 < drift, (spec, drift)  # a real restriction, not full attention
    p, _ = _rewrite(capsys, exp.path, tmp_path, "window:size=4x4")
    if name == "hf_videomae":  # NxN on a 3-D grid means N on every axis
        assert p["rewritten"] == ["attn_0", "attn_1"], p["sites"]
    p, _ = _rewrite(capsys, exp.path, tmp_path, "grid:size=2")
    assert p["rewritten"] == [] and "2-D grids" in p["sites"][0]["reason"]


def test_vision_site_without_grid_is_never_a_text_sequence(capsys, exported, tmp_path):
    """TimeSformer's time sites (F tokens per patch position) have no traced grid: skipped, with the
    reason, unless layout=sequence asks for a 1-D sequence; its space sites (CLS + H×W per frame) are
    rewritten on their grid."""
    exp = exported("hf_timesformer", "torchscript17")
    p, _ = _rewrite(capsys, exp.path, tmp_path, "neighborhood:kernel=3")
    sites = _sites(p)
    for time_site in ("attn_0", "attn_2"):
        assert sites[time_site]["status"] == "skipped"
        assert "vision tokens" in sites[time_site]["reason"] and "layout=sequence" in sites[time_site]["reason"]
    assert p["rewritten"] == ["attn_1", "attn_3"]
    p, _ = _rewrite(capsys, exp.path, tmp_path, "neighborhood:kernel=3,layout=sequence")
    assert p["rewritten"] == ["attn_0", "attn_1", "attn_2", "attn_3"], p["sites"]
    p, _ = _rewrite(capsys, exp.path, tmp_path, "window:size=2,layout=sequence")
    assert {"attn_0", "attn_2"} <= set(p["rewritten"])


@pytest.mark.parametrize("exporter", EXPORTERS_SEEN)
def test_audio_tokens_from_a_conv1d_are_a_sequence(capsys, exported, exporter, tmp_path):
    """Whisper's encoder makes its tokens with Conv1d over mel frames: the one conv axis is the token
    axis, so 1-D passes apply (no layout=sequence needed); a window over every token is exact."""
    exp = exported("hf_whisper_encoder", exporter)
    rc, stdout, _ = run(capsys, "inspect", exp.path, "--json")
    assert [(s["vision"], s["grid"]) for s in json.loads(stdout)["sites"]] == [(False, None)] * 2
    tokens = exp.meta.sites[0].q_len
    p, _ = _rewrite(capsys, exp.path, tmp_path, f"window:size={tokens}")
    assert p["rewritten"] == ["attn_0", "attn_1"], p["sites"]
    assert all(m["max_abs"] <= 1e-5 for m in p["metrics_vs_original"].values()), p["metrics_vs_original"]
    for spec in ("window:size=8", "neighborhood:kernel=5"):
        p, _ = _rewrite(capsys, exp.path, tmp_path, spec)
        assert p["rewritten"] == ["attn_0", "attn_1"], (spec, p["sites"])
        assert max(m["rel_l2"] for m in p["metrics_vs_original"].values()) > 1e-4, spec  # a real restriction


@pytest.mark.parametrize("name", ["hf_vitdet", "hf_sam_vision"])
def test_vitdet_global_layers_are_global(capsys, exported, name, tmp_path):
    """The global layer after a windowed one takes a window pass; the windowed one keeps its 4x4."""
    exp = exported(name, "torchscript17")
    rc, stdout, _ = run(capsys, "inspect", exp.path, "--json")
    sites = json.loads(stdout)["sites"]
    assert [(s["window"], s["num_heads"], s["bias"]) for s in sites] == [([4, 4], 2, "input"), (None, 2, "input")]
    p, _ = _rewrite(capsys, exp.path, tmp_path, "window:size=8x8")  # the whole 8x8 grid: exact on the global layer
    assert p["rewritten"] == ["attn_1"] and "already attends in 4x4" in _sites(p)["attn_0"]["reason"]
    assert all(m["max_abs"] <= 1e-5 for m in p["metrics_vs_original"].values())
    p, _ = _rewrite(capsys, exp.path, tmp_path, "window:size=4x4")
    assert p["rewritten"] == ["attn_1"]
    assert max(m["rel_l2"] for m in p["metrics_vs_original"].values()) > 1e-4


def test_hiera_mask_unit_sites_are_described_and_take_sdpa(capsys, exported, tmp_path):
    exp = exported("hf_hiera", "torchscript17")
    rc, stdout, _ = run(capsys, "inspect", exp.path, "--json")
    doc = json.loads(stdout)
    assert len(doc["sites"]) == 4 and not doc["rejected"]
    for spec in ("sdpa", "sdpa:fuse=ort"):
        p, out = _rewrite(capsys, exp.path, tmp_path, spec)
        assert p["rewritten"] == ["attn_0", "attn_1", "attn_2", "attn_3"], p["sites"]
        assert all(m["max_abs"] <= 1e-5 for m in p["metrics_vs_original"].values()), p["metrics_vs_original"]
    p, _ = _rewrite(capsys, exp.path, tmp_path, "window:size=4x4")
    assert p["rewritten"] == [] and all("vision tokens" in s["reason"] or "cross" in s["reason"] for s in p["sites"])


def test_layout_units_round_trip():
    """The numpy view of the units layout agrees with the ONNX one emitted for rewrites."""
    import onnx_ir as ir

    from attnrewrite.layout import output_as_bhnd, to_original_layout
    from tests.conftest import ort_run

    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5, 6)).astype(np.float32)  # [B, h, U, N, d]
    view = output_as_bhnd("units", 3, x)
    assert view.shape == (8, 3, 5, 6) and np.array_equal(view[1 * 4 + 2], x[1, :, 2])
    typ = ir.TensorType(ir.DataType.FLOAT)
    bhnd = ir.Value(name="bhnd", shape=ir.Shape([8, 3, 5, 6]), type=typ)
    original = ir.Value(name="orig", shape=ir.Shape([2, 3, 4, 5, 6]), type=typ)
    graph = ir.Graph([bhnd], [], nodes=[], opset_imports={"": 17})
    out = to_original_layout(graph, "units", bhnd, original)
    out.name = "out"
    graph.outputs.append(out)
    got = ort_run(ir.to_proto(ir.Model(graph, ir_version=10)), {"bhnd": view})["out"]
    assert np.array_equal(got, x)
