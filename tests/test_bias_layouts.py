"""Additive biases in the layouts real models add them: LeViT's `attention_biases[:, idxs]` is a
[heads, q, k] table with no batch axis, broadcast from the right against [B, heads, q, k] scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the model needs torch (pip install -e '.[torch]')")

from tests.test_cli_pipeline import run  # noqa: E402


class HeadTableBias(torch.nn.Module):
    """One attention block whose bias is a [heads, N, N] parameter (four heads: more than the two
    instances detection's numerical check keeps, which is where a batch-first reading went wrong)."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 16):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.bias = torch.nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5 + self.bias
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


def test_a_head_table_bias_without_batch_axis_is_found_and_kept(capsys, tmp_path):
    torch.manual_seed(0)
    model, x = HeadTableBias().eval(), torch.randn(3, 16, 32)
    path = tmp_path / "levit_like.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    rc, stdout, err = run(capsys, "inspect", path, "--json")
    doc = json.loads(stdout)
    assert rc == 0 and doc["rejected"] == [], (err, doc["rejected"])
    assert [(s["num_heads"], s["bias"]) for s in doc["sites"]] == [(4, "constant")]
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    rc, stdout, err = run(capsys, path, "--pass", "sdpa", "--calib", tmp_path / "calib.npz", "-o",
                          tmp_path / "out.onnx", "--json")
    assert rc == 0, err
    assert json.loads(stdout)["passes"][0]["metrics_vs_original"]["y"]["max_abs"] <= 1e-5


@pytest.mark.parametrize("exporter", ["torchscript17", "dynamo18"])
@pytest.mark.parametrize("name", ["hf_deberta_v2", "hf_bloom"])
def test_folded_heads_with_a_mask_between_two_views(capsys, exported, name, exporter, tmp_path):
    """DeBERTa-v2 and BLOOM: scores [B·h, N, N] from a bmm, viewed as [B, h, N, N] for the mask and the
    softmax, viewed back for the bmm with values (dynamo exports BLOOM's as a 4-D MatMul with V in
    [B, h, T, d]), and a bias computed from Q and K (c2p + p2c) or from positions (ALiBi + causal).
    Detection follows both views; a window over every token reproduces the model, a shorter one
    restricts it, and linear attention declines the query-dependent bias with the reason."""
    from tests.test_detect_fixtures import _rewrite

    exp = exported(name, exporter)
    rc, stdout, _ = run(capsys, "inspect", exp.path, "--json")
    assert [(s["num_heads"], s["head_dim"]) for s in json.loads(stdout)["sites"]] == \
        [(s.num_heads, s.head_dim) for s in exp.meta.sites]
    tokens = exp.meta.sites[0].q_len
    p, _ = _rewrite(capsys, exp.path, tmp_path, f"window:size={tokens}")
    assert p["rewritten"] == ["attn_0", "attn_1"], p["sites"]
    assert all(m["max_abs"] <= 1e-5 for m in p["metrics_vs_original"].values()), p["metrics_vs_original"]
    p, _ = _rewrite(capsys, exp.path, tmp_path, "window:size=4")
    assert p["rewritten"] == ["attn_0", "attn_1"]
    assert max(m["rel_l2"] for m in p["metrics_vs_original"].values()) > 1e-3
    p, _ = _rewrite(capsys, exp.path, tmp_path, "linear")
    assert p["rewritten"] == [] and all("varies per query" in s["reason"] for s in p["sites"])
    p, _ = _rewrite(capsys, exp.path, tmp_path, "sdpa:fuse=ort")  # heads unfolded for MultiHeadAttention
    assert p["rewritten"] == ["attn_0", "attn_1"], p["sites"]
    assert all(m["max_abs"] <= 1e-5 for m in p["metrics_vs_original"].values()), p["metrics_vs_original"]


@pytest.mark.parametrize("name", ["hf_deberta_v2", "hf_bloom"])
def test_folded_heads_with_a_dynamic_sequence(capsys, tmp_path, name):
    """As optimum exports them: batch and sequence both symbolic, so the weights' fold back to
    [B·h, N, T] has no static axes to compare. The site is still found (the numerical check decides),
    sdpa keeps the model exact at another length with padding, and window passes give the reason."""
    from tests.fixtures import FIXTURES

    built = FIXTURES[name].build()
    path = tmp_path / f"{name}.onnx"
    axes = {k: {0: "batch", 1: "seq"} for k in built.input_names + built.output_names}
    torch.onnx.export(built.model, built.inputs, str(path), dynamo=False, opset_version=17,
                      input_names=built.input_names, output_names=built.output_names, dynamic_axes=axes)
    rc, stdout, err = run(capsys, "inspect", path, "--json")
    doc = json.loads(stdout)
    assert rc == 0 and doc["rejected"] == [], (err, doc["rejected"])
    assert [(s["num_heads"], s["q_len"]) for s in doc["sites"]] == [(s.num_heads, None) for s in built.meta.sites]
    np.savez(tmp_path / "calib.npz", **{k: v.numpy() for k, v in zip(built.input_names, built.inputs)})
    out = tmp_path / "sdpa.onnx"
    rc, stdout, err = run(capsys, path, "--pass", "sdpa", "--calib", tmp_path / "calib.npz", "-o", out, "--json")
    assert rc == 0, err
    import onnxruntime as ort

    ids = np.random.default_rng(0).integers(5, 200, (3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    want, got = (ort.InferenceSession(str(p)).run(None, feeds)[0] for p in (path, out))
    assert want.shape == (3, 11, 32) and np.abs(want - got).max() <= 1e-5
    rc, stdout, err = run(capsys, path, "--pass", "window:size=4", "--calib", tmp_path / "calib.npz", "-o",
                          tmp_path / "w.onnx", "--json")
    assert rc == 0, err
    assert all("sequence length is dynamic" in s["reason"] for s in json.loads(stdout)["passes"][0]["sites"])
