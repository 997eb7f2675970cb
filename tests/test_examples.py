"""The digits example trains a real classifier and exports it faithfully; the benchmark builder writes
loadable models with external data and reuses them only when their build settings match."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import ort_run, ort_session, relative_max_error

torch = pytest.importorskip("torch", reason="the examples need torch (pip install -e '.[torch]')")
pytest.importorskip("sklearn", reason="the digits example needs scikit-learn")

REPO = Path(__file__).resolve().parents[1]


def _load(relpath: str):
    """Import a script from examples/ or benchmarks/ (they are not packages) under a private name."""
    path = REPO / relpath
    name = "_example_" + path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A 3-epoch digits ViT (single thread: two xdist workers share two cores)."""
    dv = _load("examples/digits_vit.py")
    out = tmp_path_factory.mktemp("digits")
    return dv, dv.train_digits_vit(out, epochs=3, seed=0, threads=1)


def test_digits_short_schedule_learns(digits):
    _, result = digits
    # chance is 0.10; three epochs reach ~0.85 on this split
    assert result["accuracy"] >= 0.5, f"held-out top-1 {result['accuracy']:.3f} after 3 epochs"


def test_digits_files_hold_a_stratified_split(digits):
    dv, result = digits
    paths = result["paths"]
    x = np.load(paths["data"])["pixel_values"]
    y = np.load(paths["labels"])
    calib = np.load(paths["calib"])["pixel_values"]
    assert x.shape == (450, 1, 32, 32) and x.dtype == np.float32, f"{x.shape=} {x.dtype=}"
    assert calib.shape[1:] == (1, 32, 32) and 0 < len(calib) <= 128, f"{calib.shape=}"
    counts = np.bincount(y, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47, f"held-out class counts not stratified: {counts}"
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.3, f"range [{x.min()}, {x.max()}], std {x.std()}"
    x_tr, x_te, _, y_te = dv.load_digits_split(0)
    assert np.array_equal(x, x_te) and np.array_equal(y, y_te), "data.npz is not the seed-0 held-out split"
    assert np.array_equal(calib, x_tr[: len(calib)]), "calibration rows are not from the training split"


def test_digits_onnx_matches_torch_with_a_dynamic_batch(digits):
    _, result = digits
    model_path = result["paths"]["model"]
    proto = onnx.load(str(model_path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("pixel_values", "logits")
    assert inp.type.tensor_type.shape.dim[0].dim_param, "batch dimension is not symbolic"
    assert sum(n.op_type == "Softmax" for n in proto.graph.node) == 4
    x = np.load(result["paths"]["data"])["pixel_values"]
    for batch in (1, 7):
        got = ort_run(model_path, {"pixel_values": x[:batch]})["logits"]
        with torch.no_grad():
            ref = result["module"](torch.tensor(x[:batch])).numpy()
        err = relative_max_error(got, ref)
        assert err < 1e-4, f"batch {batch}: ONNX vs torch relative max error {err:.2e}"


def test_evaluate_onnx_agrees_with_torch_accuracy(digits):
    dv, result = digits
    paths = result["paths"]
    labels = np.load(paths["labels"])
    top1 = dv.evaluate_onnx(paths["model"], paths["data"], paths["labels"])
    # an argmax may flip on a near-tie between fp32 runtimes: allow one image of 450
    assert abs(top1 - result["accuracy"]) <= 1 / len(labels) + 1e-9, f"onnxruntime {top1} vs torch {result['accuracy']}"
    assert dv.evaluate_onnx(paths["model"], paths["data"], labels) == top1
    shuffled = np.random.default_rng(0).permutation(labels)
    assert dv.evaluate_onnx(paths["model"], paths["data"], shuffled) < top1 - 0.3
    with pytest.raises(ValueError, match="labels"):
        dv.evaluate_onnx(paths["model"], paths["data"], labels[:-1])


TINY = dict(depth=1, dim=64, heads=4, img=64)


def test_digits_fused_training_path_is_the_exported_math():
    dv = _load("examples/digits_vit.py")
    torch.manual_seed(0)
    model = dv.DigitsViT(depth=2, patch=4).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        explicit = model(x)
        for m in model.modules():
            if isinstance(m, dv.Attention):
                m.fused_attn = True
        fused = model(x)
    assert torch.allclose(explicit, fused, atol=1e-5), f"SDPA path differs by {(explicit - fused).abs().max():.2e}"


def test_digits_resize_image_resamples_the_grid_and_keeps_cls():
    dv = _load("examples/digits_vit.py")
    torch.manual_seed(0)
    model = dv.DigitsViT(depth=1, patch=2)  # 16×16 grid
    before = model.pos_embed.detach().clone()
    model.resize_image(64)  # 32×32 grid
    after = model.pos_embed.detach()
    assert after.shape == (1, 1 + 32 * 32, before.shape[-1]) and model.img == 64
    assert torch.equal(after[0, 0], before[0, 0]), "the CLS position embedding changed"
    old = before[0, 1:].reshape(16, 16, -1)
    new = after[0, 1:].reshape(32, 32, -1)
    # bicubic ×2 upsampling: each new 2×2 block averages close to the old cell it came from
    pooled = new.reshape(16, 2, 16, 2, -1).mean(dim=(1, 3))
    assert (pooled - old).abs().max() < 0.1, f"resampled grid strays {(pooled - old).abs().max():.3f} from the old one"
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    same = dv.DigitsViT(depth=1, patch=2)
    grid = same.pos_embed.detach().clone()
    same.resize_image(32)
    assert torch.allclose(same.pos_embed.detach(), grid, atol=1e-6), "resizing to the same side is not the identity"


def test_digits_finetune_at_a_higher_resolution_exports_at_it(tmp_path):
    """`finetune_img` moves a trained model to a larger image (the 1025-token plans model does this at
    64×64): the ONNX takes the new size, the data and calibration files are at it, and the resampled
    model still classifies (one epoch at each size, far above chance)."""
    dv = _load("examples/digits_vit.py")
    result = dv.train_digits_vit(tmp_path, epochs=2, seed=0, threads=1, finetune_img=40, finetune_epochs=1)
    paths = result["paths"]
    x = np.load(paths["data"])["pixel_values"]
    assert x.shape[1:] == (1, 40, 40) and np.load(paths["calib"])["pixel_values"].shape[1:] == (1, 40, 40)
    proto = onnx.load(str(paths["model"]))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [1, 40, 40]
    assert result["accuracy"] >= 0.3, result["accuracy"]
    assert dv.evaluate_onnx(paths["model"], paths["data"], paths["labels"]) == pytest.approx(result["accuracy"], abs=0.01)


def test_build_vit_writes_external_data_that_onnxruntime_loads(tmp_path):
    bm = _load("benchmarks/models.py")
    path = bm.build_vit(tmp_path / "tiny.onnx", **TINY, seed=3)
    data = tmp_path / "tiny.onnx.data"
    assert data.exists() and data.stat().st_size > path.stat().st_size, "weights are not in the external file"
    proto = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 6, f"only {external} are external"
    assert all(e.value == "tiny.onnx.data" for t in proto.graph.initializer for e in t.external_data if e.key == "location")
    assert not list(tmp_path.glob(".tiny.onnx.tmp-*")), "temporary folder left behind"

    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    got = ort_run(path, {"pixel_values": x})["logits"]
    torch.manual_seed(3)  # the builder's weights are a pure function of the seed
    model = bm.VisionTransformer(depth=1, dim=64, heads=4, img=64, patch=16, mlp_ratio=4).eval()
    with torch.no_grad():
        ref = model(torch.tensor(x)).numpy()
    assert got.shape == (2, 1000)
    err = relative_max_error(got, ref)
    assert err < 1e-4, f"ONNX vs torch relative max error {err:.2e}"
    assert ort_session(path).get_inputs()[0].shape[0] == "batch"


def test_build_vit_inline_and_bad_arguments(tmp_path):
    bm = _load("benchmarks/models.py")
    path = bm.build_vit(tmp_path / "inline.onnx", **TINY, external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    onnx.checker.check_model(str(path))
    with pytest.raises(ValueError, match="heads"):
        bm.build_vit(tmp_path / "bad.onnx", depth=1, dim=60, heads=8, img=64)
    with pytest.raises(ValueError, match="exporter"):
        bm.build_vit(tmp_path / "bad.onnx", **TINY, exporter="tracer17")


def test_preset_reuses_only_a_matching_build(tmp_path):
    bm = _load("benchmarks/models.py")
    first = bm.preset("vit_s16_224", tmp_path, **TINY)
    stamp = first.stat().st_mtime_ns
    assert bm.stored_config(first)["depth"] == 1
    assert bm.preset("vit_s16_224", tmp_path, **TINY).stat().st_mtime_ns == stamp, "a matching build was rebuilt"
    bm.preset("vit_s16_224", tmp_path, **TINY, seed=1)
    assert first.stat().st_mtime_ns != stamp and bm.stored_config(first)["seed"] == 1, "a changed seed reused the cache"
    (tmp_path / "vit_s16_224.onnx.data").unlink()
    bm.preset("vit_s16_224", tmp_path, **TINY, seed=1)
    assert (tmp_path / "vit_s16_224.onnx.data").exists(), "a missing data file was not rebuilt"
    with pytest.raises(ValueError, match="unknown preset"):
        bm.preset("vit_xxl", tmp_path)


def test_digits_flow_through_the_cli_with_an_exact_pass(digits, tmp_path, capsys):
    dv, result = digits
    assert dv.cli_available() is None, dv.cli_available()
    assert "frobnicate" in dv.cli_available(("inspect", "frobnicate"))
    (row,) = dv.run_flow(result["paths"], ["sdpa"], tmp_path, bench_batch=4)
    assert row["top1_after"] == row["top1_before"], row
    assert row["cosine"] > 0.99999 and row["agreement"] == 1.0 and row["audit"] == "ok", row
    assert row["speedup"] is not None, row  # bench timed both models (no assertion on the timing itself)
    assert "attn_3" in capsys.readouterr().out, "inspect did not list the four sites"


def test_finetune_example_runs_end_to_end(tmp_path):
    """examples/finetune_window.py on a tiny schedule: rewrite in torch, fine-tune, export, audit; the
    exported ONNX scores what the tuned module scores."""
    ft = _load("examples/finetune_window.py")
    rows = ft.main(["--out", str(tmp_path), "--train-epochs", "1", "--distill-steps", "2", "--epochs", "1",
                    "--threads", "1"])
    assert [r["model"] for r in rows] == ["original", "window:size=2x2 (training-free)", "window:size=2x2 + fine-tune"]
    assert rows[1]["sites"] == ["attn_0", "attn_1", "attn_2", "attn_3"]
    assert abs(rows[2]["onnx_top1"] - rows[2]["top1"]) <= 1 / 450 + 1e-9
    assert rows[2]["audit_logit_cosine"] is not None
