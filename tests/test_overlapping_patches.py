"""Overlapping patch embeddings: AST cuts its spectrogram into 16×16 patches at stride 10, so the
tokens are the conv's output pixels in row-major order even though stride < kernel. The grid is read
from the conv (with AST's two prefix tokens, CLS and distillation), and spatial passes apply."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the model needs torch (pip install -e '.[torch]')")
tf = pytest.importorskip("transformers", reason="the model is transformers' AST")

from tests.fixtures.vision import sharpen_attention  # noqa: E402
from tests.test_cli_pipeline import run  # noqa: E402

MEL, FRAMES = 64, 96  # (64−16)/10+1 = 5 frequency rows, (96−16)/10+1 = 9 time columns


class _Hidden(torch.nn.Module):
    """A transformers model as `input -> last_hidden_state` with the input under its own keyword."""

    def __init__(self, model, key: str):
        super().__init__()
        self.model, self.key = model.eval(), key

    def forward(self, x):
        return self.model(**{self.key: x}).last_hidden_state


def _export(model, key: str, x, path, axes: dict[int, str] | None = None):
    """TorchScript, opset 17; `axes` are the input's symbolic axes (batch only by default, {} static)."""
    axes = {0: "b"} if axes is None else axes
    out_axes = {0: "b", **({1: "n"} if len(axes) > 1 else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Hidden(model, key).eval(), (x,), str(path), dynamo=False, opset_version=17,
                          input_names=[key], output_names=["h"],
                          dynamic_axes={key: axes, "h": out_axes} if axes else None)
    return path


@pytest.fixture(scope="module")
def ast_export(tmp_path_factory):
    cfg = tf.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=16, frequency_stride=10, time_stride=10, max_length=FRAMES, num_mel_bins=MEL)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    x = torch.randn(2, FRAMES, MEL)
    out = tmp_path_factory.mktemp("ast")
    _export(sharpen_attention(tf.ASTModel(cfg), 8.0), "input_values", x, out / "ast.onnx")
    np.savez(out / "calib.npz", input_values=x.numpy())
    return out


def _rewrite(capsys, out, spec):
    rc, stdout, err = run(capsys, out / "ast.onnx", "--pass", spec, "--calib", out / "calib.npz", "-o",
                          out / "ast.rewritten.onnx", "--force", "--json")
    assert rc == 0, err
    return json.loads(stdout)["passes"][0]


def test_ast_grid_comes_from_its_overlapping_patch_embedding(capsys, ast_export):
    rc, stdout, err = run(capsys, "inspect", ast_export / "ast.onnx", "--json")
    assert rc == 0, err
    sites = json.loads(stdout)["sites"]
    assert [(s["grid"], s["prefix_tokens"], s["q_len"]) for s in sites] == [([5, 9], 2, 47)] * 2


def test_ast_takes_spatial_passes_with_an_exact_anchor(capsys, ast_export):
    p = _rewrite(capsys, ast_export, "window:size=5x9")  # the whole grid: the original attention
    assert p["rewritten"] == ["attn_0", "attn_1"], p["sites"]
    assert p["metrics_vs_original"]["h"]["max_abs"] <= 1e-5
    for spec in ("window:size=2x3", "neighborhood:kernel=3"):
        p = _rewrite(capsys, ast_export, spec)
        assert p["rewritten"] == ["attn_0", "attn_1"], (spec, p["sites"])
        assert p["metrics_vs_original"]["h"]["rel_l2"] > 1e-3, spec  # a real restriction


def test_hiera_with_one_mask_unit_gets_no_grid(capsys, tmp_path):
    """Hiera's stem overlaps too (7×7 at stride 4), and on a 32×32 image its 8×8 tokens make one
    8×8 mask unit: the token count equals the conv's grid, but `unroll` has reordered the tokens, so
    reading the grid would make spatial passes cut windows across the wrong tokens. Mask-unit sites
    get no grid, and window passes skip them with the reason."""
    cfg = tf.HieraConfig(embed_dim=16, image_size=[32, 32], patch_size=[7, 7], patch_stride=[4, 4],
                         patch_padding=[3, 3], mlp_ratio=2.0, depths=[1, 1], num_heads=[1, 2],
                         masked_unit_size=[8, 8], query_stride=[2, 2], num_query_pool=1,
                         masked_unit_attention=[True, False])
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    path = _export(tf.HieraModel(cfg), "pixel_values", x, tmp_path / "hiera.onnx", {})  # rank-5 sites need a static batch
    rc, stdout, err = run(capsys, "inspect", path, "--json")
    assert rc == 0, err
    first = json.loads(stdout)["sites"][0]
    assert (first["q_len"], first["grid"], first["vision"]) == (64, None, True), first
    np.savez(tmp_path / "calib.npz", pixel_values=x.numpy())
    rc, stdout, err = run(capsys, path, "--pass", "window:size=4x4", "--calib", tmp_path / "calib.npz", "-o",
                          tmp_path / "out.onnx", "--force", "--json")
    assert rc == 0, err
    assert "attn_0" not in json.loads(stdout)["passes"][0]["rewritten"]


def test_dynamic_resolution_vit_keeps_its_dynamic_axes(capsys, tmp_path):
    """DINOv2 exported with symbolic height and width (position embeddings interpolated at run time).
    Canonicalisation probes dynamic dims at concrete sizes; at 2 and 3 pixels an 8×8 patch conv gives
    the same 1×1 grid, which once made every token axis "static" and broke the written model. The
    canonical graph must run at two resolutions like the original, detection must leave the token
    count open, and a rewrite must serve any resolution."""
    from attnrewrite.onnx.canonicalize import canonicalize
    from attnrewrite.onnx.modelio import load_model
    from tests.conftest import ort_run

    cfg = tf.Dinov2Config(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    path = _export(tf.Dinov2Model(cfg), "pixel_values", torch.randn(2, 3, 64, 64), tmp_path / "dinov2.onnx",
                   {0: "b", 2: "height", 3: "width"})
    import onnx_ir as ir

    ir.save(canonicalize(load_model(path)), tmp_path / "canonical.onnx")
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (48, 80)]
    for h, w in sizes:
        feeds = {"pixel_values": rng.standard_normal((1, 3, h, w)).astype(np.float32)}
        want, got = ort_run(path, feeds)["h"], ort_run(tmp_path / "canonical.onnx", feeds)["h"]
        assert want.shape == got.shape == (1, 1 + (h // 8) * (w // 8), 32) and np.abs(want - got).max() <= 1e-5
    rc, stdout, err = run(capsys, "inspect", path, "--json")
    assert [s["q_len"] for s in json.loads(stdout)["sites"]] == [None, None], stdout
    np.savez(tmp_path / "calib.npz", pixel_values=rng.standard_normal((2, 3, 64, 64)).astype(np.float32))
    rc, _, err = run(capsys, path, "--pass", "linear", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "lin.onnx")
    assert rc == 0, err
    out = ort_run(tmp_path / "lin.onnx", {"pixel_values": rng.standard_normal((1, 3, 48, 80)).astype(np.float32)})["h"]
    assert out.shape == (1, 61, 32)
    rc, stdout, err = run(capsys, path, "--pass", "window:size=4x4", "--calib", tmp_path / "calib.npz", "-o",
                          tmp_path / "win.onnx", "--json")
    assert rc == 0, err
    assert all("image size is dynamic" in s["reason"] for s in json.loads(stdout)["passes"][0]["sites"])


def test_dynamic_resolution_swin_sites_are_verified_from_real_image_sizes(capsys, tmp_path):
    """Swin with symbolic height and width: the second stage's site ties its axes to the input, so its
    numerical check runs the model's own prefix, where a 2×2 image cannot pass the patch conv; the
    prefix run tries image-sized inputs. Both sites are found, vision sites, and no spatial pass
    rewrites them as a 1-D sequence."""
    cfg = tf.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    path = _export(tf.SwinModel(cfg), "pixel_values", torch.randn(1, 3, 64, 64), tmp_path / "swin.onnx",
                   {0: "b", 2: "height", 3: "width"})
    rc, stdout, err = run(capsys, "inspect", path, "--json")
    doc = json.loads(stdout)
    assert rc == 0 and doc["rejected"] == [] and len(doc["sites"]) == 2, doc["rejected"]
    assert all(s["vision"] for s in doc["sites"])
    np.savez(tmp_path / "calib.npz", pixel_values=np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32))
    rc, stdout, err = run(capsys, path, "--pass", "window:size=2", "--calib", tmp_path / "calib.npz", "-o",
                          tmp_path / "w.onnx", "--json")
    assert rc == 0 and json.loads(stdout)["passes"][0]["rewritten"] == [], err
