"""`--target tensorrt` end to end through the CLI, and `attnrewrite build` as far as it runs here.

TensorRT cannot be installed on this project's machines (its libraries package fetches from outside the
registry), so the engine build/run test at the bottom is skipped with that reason; everything before
the `require_tensorrt` step of `build` (the plugin graph it writes and checks) runs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from attnrewrite.cli import main
from attnrewrite.plugins.catalog import PLUGIN_DOMAIN, PLUGIN_NAMESPACE
from attnrewrite.plugins.tensorrt import NOT_INSTALLED
from tests.conftest import ort_run


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


PASSES = ["window:size=4x4,shift=alternate", "neighborhood:kernel=3,dilation=2", "paro:density=0.5,block=32,bits=8"]
PLUGINS = {"window": "WindowAttention", "neighborhood": "NeighborhoodAttention", "paro": "BlockSparseAttention"}


@pytest.mark.parametrize("spec", PASSES)
def test_tensorrt_target_computes_the_plain_rewrite(capsys, tmp_path, vit32, spec):
    model, calib = vit32
    plain, trt = tmp_path / "plain.onnx", tmp_path / "trt.onnx"
    rc, _, err = run(capsys, model, "--pass", spec, "--calib", calib, "-o", plain, "--json")
    assert rc == 0, err
    rc, out, err = run(capsys, model, "--pass", spec, "--calib", calib, "-o", trt, "--target", "tensorrt", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    plugin = PLUGINS[spec.split(":")[0]]
    assert doc["target"] == "tensorrt"
    assert [s["target"] for s in doc["passes"][0]["sites"]] == [f"{plugin} plugin"] * 2
    proto = onnx.load(trt)
    onnx.checker.check_model(proto)
    nodes = [n for n in proto.graph.node if n.domain == PLUGIN_DOMAIN]
    assert [n.op_type for n in nodes] == [plugin] * 2 and {n.overload for n in nodes} == {"attn_0", "attn_1"}
    assert {(f.domain, f.name, f.overload) for f in proto.functions} == {(PLUGIN_DOMAIN, plugin, "attn_0"),
                                                                          (PLUGIN_DOMAIN, plugin, "attn_1")}
    assert [i.name for i in proto.graph.input] == [i.name for i in onnx.load(model).graph.input]
    x = np.load(calib)["x"][:4]
    a, b = ort_run(plain, {"x": x}), ort_run(trt, {"x": x})
    assert a.keys() == b.keys() and all(np.abs(a[n] - b[n]).max() <= 1e-5 for n in a)


def test_default_output_name_marks_the_target(capsys, tmp_path, vit32):
    model, _ = vit32
    copy = tmp_path / "m.onnx"
    copy.write_bytes(model.read_bytes())
    rc, _, err = run(capsys, copy, "--pass", "window:size=4x4", "--target", "tensorrt")
    assert rc == 0, err
    assert (tmp_path / "m.window.trt.onnx").exists()


def test_sites_without_a_kernel_are_reported_and_stay_plain(capsys, tmp_path, vit32):
    model, _ = vit32
    rc, out, err = run(capsys, model, "--pass", "window:size=4x4,prefix=local", "--target", "tensorrt",
                       "-o", tmp_path / "o.onnx", "--json")
    assert rc == 0, err
    targets = [s["target"] for s in json.loads(out)["passes"][0]["sites"]]
    assert targets == ["plain ONNX: the kernels keep prefix tokens global (prefix=local has no kernel)"] * 2
    proto = onnx.load(tmp_path / "o.onnx")
    assert not proto.functions and all(n.domain != PLUGIN_DOMAIN for n in proto.graph.node)
    rc, _, _ = run(capsys, model, "--pass", "window:size=4x4,prefix=local", "--target", "tensorrt",
                   "-o", tmp_path / "o.onnx", "--force", "--report", tmp_path / "report")
    assert rc == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| TensorRT |" in markdown and "prefix=local has no kernel" in markdown


def test_fallback_drops_the_bodies_of_reverted_sites(capsys, tmp_path, vit32):
    model, calib = vit32
    rc, out, err = run(capsys, model, "--pass", "window:size=2x2", "--target", "tensorrt", "--calib", calib,
                       "--budget", "cosine>=0.999999", "--fallback", "-o", tmp_path / "o.onnx", "--json")
    doc = json.loads(out)
    kept = doc["passes"][0]["kept_original"]
    assert kept, "the budget is meant to force a fallback"
    proto = onnx.load(tmp_path / "o.onnx")
    called = {n.overload for n in proto.graph.node if n.domain == PLUGIN_DOMAIN}
    assert {f.overload for f in proto.functions} == called
    assert not called & set(kept)


def test_build_without_tensorrt_writes_the_plugin_graph_and_exits_2(capsys, tmp_path, vit32):
    pytest.importorskip("numpy")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be observed")
    except ImportError:
        pass
    model, calib = vit32
    trt_model = tmp_path / "w.trt.onnx"
    assert run(capsys, model, "--pass", "neighborhood:kernel=3", "--target", "tensorrt", "-o", trt_model)[0] == 0
    rc, out, err = run(capsys, "build", trt_model, "--engine", tmp_path / "w.plan")
    assert rc == 2
    flat = " ".join(err.split())
    assert NOT_INSTALLED in flat and "w.plugins.onnx" in flat
    stripped = onnx.load(tmp_path / "w.plugins.onnx")
    onnx.checker.check_model(stripped)
    assert not stripped.functions
    nodes = [n for n in stripped.graph.node if n.domain == PLUGIN_NAMESPACE]
    assert len(nodes) == 2 and all(n.op_type == "NeighborhoodAttention" for n in nodes)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"attnrewrite" and attrs["aot"] == 1
        assert list(attrs["kernel"]) == [3, 3] and list(attrs["grid"]) == [8, 8] and attrs["prefix"] == 1
    assert not (tmp_path / "w.plan").exists()
    assert onnx.load(trt_model).functions, "the input model keeps its bodies"
    rc, _, err = run(capsys, "build", trt_model, "--engine", tmp_path / "w.plan")
    assert rc == 2 and "already exists" in err


def test_tensorrt_target_takes_one_pass(capsys, tmp_path, vit32):
    model, _ = vit32
    rc, _, err = run(capsys, model, "--pass", "sdpa", "--pass", "window:size=4x4", "--target", "tensorrt",
                     "-o", tmp_path / "o.onnx")
    assert rc == 2 and "one --pass" in err and not (tmp_path / "o.onnx").exists()


def test_build_usage_errors(capsys, tmp_path, vit32):
    model, _ = vit32
    rc, _, err = run(capsys, "build", model, "--engine", tmp_path / "e.plan", "--fp16", "--int8")
    assert rc == 2 and "one of --fp16 and --int8" in err
    rc, _, err = run(capsys, "build", tmp_path / "missing.onnx", "--engine", tmp_path / "e.plan")
    assert rc == 2


def test_engine_matches_onnxruntime(capsys, tmp_path, vit32):
    """Needs TensorRT and an NVIDIA GPU: never runs on this project's machines (see module docstring)."""
    pytest.importorskip("tensorrt", reason="TensorRT cannot be installed on these machines (its libraries "
                                           "package fetches from outside the registry)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    model, calib = vit32
    trt_model = tmp_path / "w.trt.onnx"
    assert run(capsys, model, "--pass", "window:size=4x4", "--target", "tensorrt", "-o", trt_model)[0] == 0
    rc, out, err = run(capsys, "build", trt_model, "--engine", tmp_path / "w.plan", "--calib", calib,
                       "--budget", "cosine>=0.9999", "--json")
    assert rc == 0, err
    assert json.loads(out)["plugin_nodes"] == 2
