"""`quant`/`int8`/`int4`/`paro` through the CLI: real exporters' graphs, exit codes, and the report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from attnrewrite.validate import calib as C
from tests import onnx_builders as B
from tests.test_cli_pipeline import run


@pytest.fixture
def vit(tmp_path):
    path = tmp_path / "vit.onnx"
    onnx.save(B.tiny_vit(depth=2), path)
    return path


def _calib(model, tmp_path, samples=4, seed=0, tokens=None):
    """A seeded random calibration set written as a file, i.e. data the user gives with --calib;
    `tokens` fixes a dynamic sequence axis of [batch, sequence] inputs."""
    specs = C.input_specs(str(model))
    shapes = {s.name: (1, tokens) for s in specs} if tokens else {}
    batches = C.load_calibration(None, specs, shapes, num_samples=samples, seed=seed).batches
    path = tmp_path / f"calib_{seed}.npz"
    np.savez(path, **{name: np.concatenate([b[name] for b in batches]) for name in batches[0]})
    return path


def _rewrite(capsys, model, tmp_path, spec, *extra):
    out = tmp_path / "out.onnx"
    rc, stdout, err = run(capsys, model, "--pass", spec, "-o", out, "--force", "--json", *extra)
    return rc, (json.loads(stdout) if stdout.strip() else None), err, out


@pytest.mark.parametrize("spec", ["paro", "quant:scales=static", "int8:scales=static,granularity=head"])
def test_fitted_tables_refuse_random_calibration(capsys, vit, tmp_path, spec):
    rc, doc, err, out = _rewrite(capsys, vit, tmp_path, spec)
    assert rc == 2 and "--calib" in err and "Traceback" not in err
    assert not out.exists()


def test_dynamic_int8_needs_no_calibration_and_reports_its_choices(capsys, vit, tmp_path):
    rc, doc, err, out = _rewrite(capsys, vit, tmp_path, "int8", "--report", tmp_path / "rep")
    assert rc == 0, err
    site = doc["passes"][0]["sites"][0]
    assert site["plan"]["Q·Kᵀ"] == "int8" and "dynamic" in site["plan"]["scales"]
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"MatMulIntegerToFloat", "QuantizeLinear"} <= ops
    assert doc["passes"][0]["metrics_vs_original"]["logits"]["cosine"] > 0.99
    assert "what int8 decided per site" in (tmp_path / "rep" / "report.md").read_text()


def test_int4_says_it_is_simulated(capsys, vit, tmp_path):
    rc, doc, err, _ = _rewrite(capsys, vit, tmp_path, "int4")
    assert rc == 0, err
    assert "simulated" in doc["passes"][0]["sites"][0]["plan"]["Q·Kᵀ"]
    rc, out, _ = run(capsys, "passes", "--json")
    described = {p["name"]: p for p in json.loads(out)["passes"]}
    assert "simulated" in described["int4"]["description"] and "simulated" in described["paro"]["description"]


def test_paro_report_lists_orders_density_and_mass(capsys, vit, tmp_path):
    calib = _calib(vit, tmp_path)
    rc, doc, err, _ = _rewrite(capsys, vit, tmp_path, "paro:density=0.5,block=4", "--calib", calib)
    assert rc == 0, err
    for site in doc["passes"][0]["sites"]:
        plan = site["plan"]
        assert len(plan["order per head"]) == 2 and set(plan["order per head"]) <= {"hw", "wh", "tile:2"}
        assert all(0.4 < d < 0.7 for d in plan["density kept per head"])
        assert all(0 < m <= 1 for m in plan["calibration mass kept per head"])


def test_paro_clamps_a_block_longer_than_the_sequence(capsys, vit, tmp_path):
    rc, doc, err, _ = _rewrite(capsys, vit, tmp_path, "paro:block=64,density=1,bits=16", "--calib", _calib(vit, tmp_path))
    assert rc == 0, err
    p = doc["passes"][0]
    assert any("clamped to 16" in n for n in p["sites"][0]["plan"]["notes"])
    assert p["metrics_vs_original"]["logits"]["rel_l2"] < 1e-5


@pytest.mark.parametrize("spec,needle", [
    ("paro:bits=2", "bits must be 4, 8 or 16"), ("int8:bits=16", "bits must be 8 or 4"),
    ("paro:density=0", "density must be in (0, 1]"), ("paro:reorder=diagonal", "expected auto, none"),
    ("quant:granularity=row", "expected tensor, head"), ("int8:smooth_k=maybe", "true or false"),
])
def test_bad_parameters_exit_2(capsys, vit, tmp_path, spec, needle):
    rc, _, err, _ = _rewrite(capsys, vit, tmp_path, spec)
    assert rc == 2 and needle in err, err


def test_non_finite_calibration_activations_exit_2(capsys, vit, tmp_path):
    """Finite inputs whose activations overflow: the fit refuses them in one sentence."""
    path = tmp_path / "huge.npz"
    np.savez(path, x=np.full((2, 3, 16, 16), 3e38, np.float32))
    rc, _, err, out = _rewrite(capsys, vit, tmp_path, "paro", "--calib", path)
    assert rc == 2 and "NaN or inf" in err and "Traceback" not in err, err
    assert not out.exists()


# --- exporters' graphs -------------------------------------------------------------------------


FIXTURES = [("vit_fused", "torchscript17"), ("deit_tiny", "dynamo18"), ("hf_vit", "torchscript17"),
            ("dinov2_reg4", "torchscript17"), ("hf_videomae", "torchscript17"), ("minilm", "torchscript17"),
            ("hf_bert", "dynamo18")]


@pytest.mark.parametrize("name,exporter", FIXTURES)
def test_exports_take_quantised_passes(capsys, exported, tmp_path, name, exporter):
    """On exporters' graphs: paro at density 1 in float is the original (per-head orders included);
    int8 and sparse INT8 paro rewrite every site and keep the model valid."""
    exp = exported(name, exporter)
    calib = _calib(exp.path, tmp_path)
    sites = len(exp.meta.sites)
    rc, doc, err, _ = _rewrite(capsys, exp.path, tmp_path, "paro:density=1,bits=16,block=8", "--calib", calib)
    assert rc == 0, err
    p = doc["passes"][0]
    assert len(p["rewritten"]) == sites, p["sites"]
    assert all(m["rel_l2"] < 1e-5 for m in p["metrics_vs_original"].values()), p["metrics_vs_original"]
    for spec in ("int8", "paro:density=0.5,block=8"):
        rc, doc, err, _ = _rewrite(capsys, exp.path, tmp_path, spec, "--calib", calib)
        assert rc == 0, err
        p = doc["passes"][0]
        assert len(p["rewritten"]) == sites, (spec, p["sites"])
        assert all(0 < s["local"]["cosine"] < 1 + 1e-6 for s in p["sites"])


def test_dynamic_sequence_declines_paro_but_takes_int8(capsys, exported, tmp_path):
    exp = exported("minilm_dynamic", "torchscript17")
    calib = _calib(exp.path, tmp_path, tokens=16)
    rc, doc, err, _ = _rewrite(capsys, exp.path, tmp_path, "paro", "--calib", calib)
    assert rc == 0, err
    assert all("static token count" in s["reason"] for s in doc["passes"][0]["sites"])
    rc, doc, err, _ = _rewrite(capsys, exp.path, tmp_path, "int8", "--calib", calib)
    assert rc == 0 and len(doc["passes"][0]["rewritten"]) == len(exp.meta.sites), err


def _dit_style(tmp_path):
    """The diffusers-style DiT of benchmarks/models.py (latent patches, no CLS, q/k LayerNorm, adaLN from a
    timestep), exported by torch: the model family PARO targets."""
    pytest.importorskip("torch")
    from tests.test_examples import _load

    return _load("benchmarks/models.py").export_dit(tmp_path / "dit.onnx", depth=2, dim=32, heads=2, latent=16)


def test_dit_style_model_takes_paro_and_int8(capsys, tmp_path):
    """No prefix tokens, q/k-norm before the product: every token is on the 8×8 grid and gets reordered."""
    path = _dit_style(tmp_path)
    calib = _calib(path, tmp_path)
    rc, doc, err, _ = _rewrite(capsys, path, tmp_path, "paro:density=1,bits=16,block=16", "--calib", calib)
    assert rc == 0, err
    p = doc["passes"][0]
    assert len(p["rewritten"]) == 2 and p["metrics_vs_original"]["noise"]["rel_l2"] < 1e-5
    assert "0 global tokens" in p["sites"][0]["plan"]["blocks"]
    rc, doc, err, _ = _rewrite(capsys, path, tmp_path, "paro:density=0.5,block=16,reorder=tile:4", "--calib", calib)
    assert rc == 0, err
    assert doc["passes"][0]["sites"][0]["plan"]["order per head"] == ["tile:4", "tile:4"]
    rc, doc, err, _ = _rewrite(capsys, path, tmp_path, "int8", "--calib", calib)
    assert rc == 0 and doc["passes"][0]["metrics_vs_original"]["noise"]["cosine"] > 0.99, err


def test_old_opset_is_declined_with_the_reason(capsys, tmp_path):
    """Per-row P needs per-axis QuantizeLinear (opset 13): an opset-12 model keeps its attention, said why."""
    path = tmp_path / "attention12.onnx"
    onnx.save(B.plain_attention(opset=12, self_attention=True, project=True), path)
    rc, doc, err, _ = _rewrite(capsys, path, tmp_path, "int8")
    assert rc == 0, err
    assert doc["passes"][0]["rewritten"] == []
    assert all("opset >= 13" in s["reason"] for s in doc["passes"][0]["sites"])
    onnx.save(B.plain_attention(opset=13, self_attention=True, project=True), path)
    for spec in ("int8", "int4", "quant:granularity=block:4"):
        rc, doc, err, _ = _rewrite(capsys, path, tmp_path, spec)
        assert rc == 0 and doc["passes"][0]["rewritten"] == ["attn_0"], (spec, err)
