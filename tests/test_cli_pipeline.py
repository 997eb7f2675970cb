"""The CLI end to end on torch-free models: rewrite, validation honesty, budgets, fallback, audit, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from attnrewrite.cli import main
from tests import onnx_builders as B
from tests.conftest import ort_run


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def vit(tmp_path) -> Path:
    path = tmp_path / "vit.onnx"
    onnx.save(B.tiny_vit(depth=3), path)
    return path


@pytest.fixture
def calib(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((6, 3, 16, 16)).astype(np.float32))
    return path


def test_inspect_json_schema(capsys, vit):
    rc, out, err = run(capsys, "inspect", vit, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert set(doc) >= {"model", "opset", "sites", "rejected"} and doc["opset"] == 17
    types = {"id": str, "op": str, "kind": str, "num_heads": int, "head_dim": int, "q_len": int, "kv_len": int,
             "instances": int, "scale": float, "bias": str, "window": type(None), "grid": list,
             "prefix_tokens": int, "rotary": bool, "verified": bool, "nodes": list, "notes": list}
    assert len(doc["sites"]) == 3
    for site in doc["sites"]:
        for key, kind in types.items():
            assert isinstance(site[key], kind), (key, site[key])
        assert site["kind"] in ("self", "cross") and site["bias"] in ("none", "constant", "input")
        assert site["grid"] == [4, 4] and site["prefix_tokens"] == 1


def test_inspect_no_attention_exit_4(capsys, tmp_path):
    path = tmp_path / "cls.onnx"
    onnx.save(B.classifier_softmax(), path)
    rc, out, err = run(capsys, "inspect", path, "--json")
    assert rc == 4
    doc = json.loads(out)
    assert doc["sites"] == [] and doc["rejected"][0]["reason"]


def test_sdpa_is_exact_and_output_valid(capsys, vit, calib):
    before = vit.read_bytes()
    rc, out, err = run(capsys, vit, "--pass", "sdpa", "--calib", calib, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    written = Path(doc["output"])
    assert written == vit.with_name("vit.sdpa.onnx") and written.exists()
    assert vit.read_bytes() == before  # input untouched
    model = onnx.load(written)
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(vit)
    assert [(i.name, i.type) for i in model.graph.input] == [(i.name, i.type) for i in original.graph.input]
    assert [(o.name, o.type) for o in model.graph.output] == [(o.name, o.type) for o in original.graph.output]
    metrics = doc["passes"][0]["metrics_vs_original"]["logits"]
    assert metrics["max_abs"] <= 1e-5 and metrics["cosine"] >= 1 - 1e-9
    assert len(doc["passes"][0]["rewritten"]) == 3


def test_report_numbers_are_recomputable(capsys, vit, calib, tmp_path):
    """An independent recomputation from ORT outputs must give the report's cosine and rel-L2."""
    out_path = tmp_path / "lin.onnx"
    rc, out, err = run(capsys, vit, "--pass", "linear", "--calib", calib, "-o", out_path, "--report", tmp_path / "rep", "--json")
    assert rc == 0, err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# attnrewrite report")
    x = np.load(calib)["x"]
    ref = ort_run(vit, {"x": x})["logits"].astype(np.float64)
    new = ort_run(out_path, {"x": x})["logits"].astype(np.float64)
    cos = np.mean(np.sum(ref * new, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1)))
    rel = np.linalg.norm(ref - new) / np.linalg.norm(ref)
    got = report["passes"][0]["metrics_vs_original"]["logits"]
    assert got["cosine"] == pytest.approx(cos, abs=1e-6)
    assert got["rel_l2"] == pytest.approx(rel, rel=1e-4)
    assert rel > 1e-3  # linear attention is lossy on sharpened attention: the number is not zero
    assert report["input"]["sha256"] and report["calibration"]["source"].startswith("npz:")


def test_budget_exceeded_exit_1_still_writes(capsys, vit, calib, tmp_path):
    out_path = tmp_path / "lin.onnx"
    rc, out, err = run(capsys, vit, "--pass", "linear", "--calib", calib, "-o", out_path,
                       "--budget", "cosine>=0.9999999", "--json")
    assert rc == 1
    doc = json.loads(out)
    assert out_path.exists() and doc["status"] == "budget_exceeded"
    assert doc["budgets"][0]["passed"] is False


def test_budget_scoped_to_an_output(capsys, vit, calib, tmp_path):
    out_path = tmp_path / "lin.onnx"
    rc, out, err = run(capsys, vit, "--pass", "linear", "--calib", calib, "-o", out_path,
                       "--budget", "logits:cosine>=0.9999999", "--json")
    assert rc == 1 and json.loads(out)["budgets"][0]["budget"] == "logits:cosine>=0.9999999"
    rc, out, err = run(capsys, vit, "--pass", "linear", "--calib", calib, "-o", out_path, "--force",
                       "--budget", "probs:cosine>=0.9")
    assert rc == 2 and "outputs are 'logits'" in err and "Traceback" not in err
    rc, out, err = run(capsys, "audit", vit, out_path, "--calib", calib, "--budget", "probs:cosine>=0.9")
    assert rc == 2 and "outputs are 'logits'" in err


def test_fallback_keeps_worst_sites(capsys, vit, calib, tmp_path):
    out_path = tmp_path / "lin.onnx"
    rc, out, err = run(capsys, vit, "--pass", "linear", "--calib", calib, "-o", out_path,
                       "--budget", "cosine>=0.99999", "--fallback", "--json")
    doc = json.loads(out)
    p = doc["passes"][0]
    assert p["kept_original"], "fallback should have reverted at least one site"
    alone = {s["id"]: s["sensitivity"]["cosine"] for s in p["sites"] if s["sensitivity"]}
    locals_ = {s["id"]: s["local"]["rel_l2"] for s in p["sites"] if s["local"]}
    worst = min(alone, key=alone.get)  # the most sensitive site: the fallback's order
    assert worst in p["kept_original"]
    if rc == 0:
        assert p["metrics_vs_original"]["logits"]["cosine"] >= 0.99999
    else:
        assert rc == 1 and set(p["kept_original"]) == set(locals_)


def test_sites_selector(capsys, vit, calib, tmp_path):
    rc, out, err = run(capsys, vit, "--pass", "linear", "--sites", "1", "--calib", calib, "-o", tmp_path / "o.onnx", "--json")
    assert rc == 0, err
    p = json.loads(out)["passes"][0]
    assert p["rewritten"] == ["attn_1"]
    assert {s["id"]: s["status"] for s in p["sites"]} == {"attn_0": "unselected", "attn_1": "rewritten", "attn_2": "unselected"}


def test_refuses_overwrite_without_force(capsys, vit, calib, tmp_path):
    out_path = tmp_path / "o.onnx"
    out_path.write_bytes(b"keep me")
    rc, _, err = run(capsys, vit, "--pass", "sdpa", "--calib", calib, "-o", out_path)
    assert rc == 2 and "--force" in err and out_path.read_bytes() == b"keep me"
    rc, _, err = run(capsys, vit, "--pass", "sdpa", "--calib", calib, "-o", out_path, "--force")
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(out_path))


@pytest.mark.parametrize("spec,needle", [
    ("nope", "available passes"),
    ("linear:foo=1", "valid parameters"),
    ("linear:phi=tanh", "elu1"),
    ("window:size=0", "positive"),
    ("linear:eps", "key=value"),
])
def test_bad_pass_specs_exit_2(capsys, vit, spec, needle):
    rc, out, err = run(capsys, vit, "--pass", spec)
    assert rc == 2 and needle in err and "Traceback" not in err


def _npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["wrong_key", "wrong_shape", "wrong_dtype", "pickled", "nan", "bad_shape_flag"])
def test_bad_calibration_exit_2(capsys, vit, tmp_path, case):
    x = np.zeros((2, 3, 16, 16), np.float32)
    args = []
    if case == "wrong_key":
        args = ["--calib", _npz(tmp_path, "c.npz", pixels=x)]
    elif case == "wrong_shape":
        args = ["--calib", _npz(tmp_path, "c.npz", x=np.zeros((2, 3, 8, 8), np.float32))]
    elif case == "wrong_dtype":
        args = ["--calib", _npz(tmp_path, "c.npz", x=np.zeros((2, 3, 16, 16), np.int64))]
    elif case == "pickled":
        args = ["--calib", _npz(tmp_path, "c.npz", x=np.array([object()], dtype=object))]
    elif case == "nan":
        x[0, 0, 0, 0] = np.nan
        args = ["--calib", _npz(tmp_path, "c.npz", x=x)]
    elif case == "bad_shape_flag":
        args = ["--shape", "x=1by3"]
    rc, out, err = run(capsys, vit, "--pass", "sdpa", "-o", tmp_path / "o.onnx", *args)
    assert rc == 2, err
    assert "Traceback" not in err and err.strip()


# --- audit and its mutation tests -------------------------------------------------------------


def _mutate(src: Path, dst: Path, how: str) -> None:
    model = onnx.load(src)
    g = model.graph
    if how == "scale_x2":
        for t in g.initializer:
            if t.name == "scale":
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2, "scale"))
    elif how == "swap_heads":
        node = next(n for n in g.node if n.output == ["l1_o"])
        g.initializer.append(numpy_helper.from_array(np.array([1, 0], np.int64), "swap"))
        node.output[0] = "l1_o_raw"
        g.node.insert(list(g.node).index(node) + 1, helper.make_node("Gather", ["l1_o_raw", "swap"], ["l1_o"], axis=1))
    elif how == "drop_mask":
        node = next(n for n in g.node if n.op_type == "Add" and "mask" in n.input)
        node.op_type, node.input[:] = "Identity", [node.input[0]]
    onnx.save(model, dst)


@pytest.mark.parametrize("how", ["scale_x2", "swap_heads", "drop_mask"])
def test_audit_flags_mutations(capsys, tmp_path, how):
    if how == "drop_mask":
        src = tmp_path / "m.onnx"
        onnx.save(B.plain_attention("input", n=8), src)
        mask = np.zeros((4, 1, 1, 8), np.float32)
        mask[..., 5:] = -1e9
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((4, 2, 8, 4)).astype(np.float32) * 2 for _ in range(3))
        calib = _npz(tmp_path, "c.npz", q=q, k=k, v=v, mask=mask)
        args = ["--calib", calib]
    else:
        src = tmp_path / "vit.onnx"
        onnx.save(B.tiny_vit(depth=2), src)
        args = []
    bad = tmp_path / "bad.onnx"
    _mutate(src, bad, how)
    rc, out, err = run(capsys, "audit", src, src, *args, "--json")
    assert rc == 0, err
    rc, out, err = run(capsys, "audit", src, bad, *args, "--json")
    assert rc == 1, f"{how} not flagged: {out}"
    assert json.loads(out)["status"] == "budget_exceeded"


def test_audit_pairs_sites_by_provenance(capsys, vit, calib, tmp_path):
    out_path = tmp_path / "lin.onnx"
    assert run(capsys, vit, "--pass", "linear", "--calib", calib, "-o", out_path)[0] == 0
    rc, out, err = run(capsys, "audit", vit, out_path, "--calib", calib, "--budget", "cosine>=0.5", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["pairing"] == "provenance" and len(doc["sites"]) == 3
    assert all(0 < s["rel_l2"] < 1 for s in doc["sites"])


# --- bad model files ---------------------------------------------------------------------------


def _external(tmp_path, location: str) -> Path:
    model = B.plain_attention("const")
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    proto = onnx.load(path, load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("case", ["missing", "not_onnx", "truncated", "escaping", "absolute", "missing_data"])
def test_bad_model_files_exit_2_subprocess(tmp_path, case):
    if case == "missing":
        path = tmp_path / "nope.onnx"
    elif case == "not_onnx":
        path = tmp_path / "x.onnx"
        path.write_text("hello")
    elif case == "truncated":
        path = tmp_path / "t.onnx"
        data = B.tiny_vit().SerializeToString()
        path.write_bytes(data[: len(data) // 2])
    elif case == "escaping":
        path = _external(tmp_path, "../w.data")
    elif case == "absolute":
        path = _external(tmp_path, "/etc/passwd")
    else:
        path = _external(tmp_path, "other.data")
    proc = subprocess.run([sys.executable, "-m", "attnrewrite", "inspect", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2


def test_external_data_is_kept(capsys, tmp_path, calib):
    src = tmp_path / "ext.onnx"
    onnx.save(B.tiny_vit(), src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data", size_threshold=256)
    out_path = tmp_path / "out.onnx"
    rc, _, err = run(capsys, src, "--pass", "sdpa", "--calib", calib, "-o", out_path)
    assert rc == 0, err
    proto = onnx.load(out_path, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    x = np.load(calib)["x"]
    np.testing.assert_allclose(ort_run(out_path, {"x": x})["logits"], ort_run(src, {"x": x})["logits"], atol=1e-5)


def test_exit_codes_subprocess(tmp_path, vit, calib):
    out_path = tmp_path / "o.onnx"
    base = [sys.executable, "-m", "attnrewrite", str(vit), "--calib", str(calib), "-o", str(out_path)]
    assert subprocess.run(base + ["--pass", "sdpa"], capture_output=True).returncode == 0
    proc = subprocess.run(base + ["--pass", "linear", "--force", "--budget", "cosine>=0.9999999"], capture_output=True, text=True)
    assert proc.returncode == 1 and "budget" in proc.stderr
    assert subprocess.run(base + ["--pass", "bogus"], capture_output=True).returncode == 2


def test_onnx_path_runs_without_torch(tmp_path, vit, calib):
    """torch is an optional extra: block its import and run inspect + rewrite + audit."""
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from attnrewrite.cli import main\n"
        f"assert main(['inspect', {str(vit)!r}]) == 0\n"
        f"assert main([{str(vit)!r}, '--pass', 'linear', '--calib', {str(calib)!r}, '-o', {str(tmp_path / 'o.onnx')!r}]) == 0\n"
        f"assert main(['audit', {str(vit)!r}, {str(tmp_path / 'o.onnx')!r}, '--budget', 'cosine>=0.5']) == 0\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_click_runner_sees_the_documented_exit_codes(tmp_path, vit, calib):
    """CliRunner drives the click group itself: errors are mapped there, not only in the console script."""
    from click.testing import CliRunner

    from attnrewrite.cli import cli

    runner = CliRunner()
    ok = runner.invoke(cli, ["inspect", str(vit), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["sites"]
    out = tmp_path / "lin.onnx"
    over = runner.invoke(cli, [str(vit), "--pass", "linear", "--calib", str(calib), "-o", str(out),
                               "--budget", "cosine>=0.9999999"])
    assert over.exit_code == 1 and out.exists()
    bad = runner.invoke(cli, [str(vit), "--pass", "nope"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    none = tmp_path / "cls.onnx"
    onnx.save(B.classifier_softmax(), none)
    assert runner.invoke(cli, ["inspect", str(none)]).exit_code == 4


def test_input_model_onnxruntime_cannot_load_is_exit_2(capsys, tmp_path):
    """Exporters emit such files (opset-18 Split attributes under opset 17): the input is at fault."""
    model = B.plain_attention("none", project=True)
    split = helper.make_node("Split", ["y"], ["y0", "y1"], axis=-1, num_outputs=2)  # opset-18 attribute
    model.graph.node.append(split)
    model.graph.output.append(helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, None))
    path = tmp_path / "bad_split.onnx"
    onnx.save(model, path)
    rc, out, err = run(capsys, path, "--pass", "sdpa", "-o", tmp_path / "o.onnx")
    assert rc == 2 and "onnxruntime cannot load" in err and "Traceback" not in err
    rc, out, err = run(capsys, "audit", path, path)
    assert rc == 2 and "onnxruntime cannot load" in err
