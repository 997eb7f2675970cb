"""Detection on hand-written graphs: negatives, bias kinds, fused ops, numerical verification."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from attnrewrite.onnx.analysis import analyze
from tests import onnx_builders as B


def _analyze(tmp_path, model: onnx.ModelProto):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return analyze(path)


@pytest.mark.parametrize("builder", [B.classifier_softmax, B.moe_gate])
def test_negatives_are_rejected_with_reason(tmp_path, builder):
    a = _analyze(tmp_path, builder())
    assert a.sites == []
    assert len(a.detection.rejected) == 1
    assert a.detection.rejected[0].reason


def test_moe_gate_reason_names_the_constant_weight(tmp_path):
    a = _analyze(tmp_path, B.moe_gate())
    assert "constant" in a.detection.rejected[0].reason


@pytest.mark.parametrize("bias,kind", [("none", "none"), ("zero", "none"), ("row_shift", "none"), ("const", "constant"),
                                       ("input", "input")])
def test_bias_kinds(tmp_path, bias, kind):
    a = _analyze(tmp_path, B.plain_attention(bias))
    (site,) = a.sites
    assert site.bias_kind == kind
    assert site.scale == pytest.approx(0.5)
    assert (site.num_heads, site.head_dim, site.q_len, site.kv_len) == (2, 4, 6, 6)
    assert site.verified


@pytest.mark.parametrize("factor", ["per_head", "per_query"])
def test_logit_factor_that_scales_rows_is_folded_into_q(tmp_path, factor):
    """Swin V2 multiplies cosine logits by a learned temperature per head: a scale of Q's rows."""
    a = _analyze(tmp_path, B.plain_attention("const", logit_factor=factor))
    (site,) = a.sites
    assert site.verified and site.scale == pytest.approx(0.5)
    assert site.q.producer().op_type == "Mul" and any("folded into Q" in n for n in site.notes)


def test_logit_factor_per_key_is_not_a_scale(tmp_path):
    a = _analyze(tmp_path, B.plain_attention("none", logit_factor="per_key"))
    assert a.sites == []
    assert "non-scalar" in a.detection.rejected[0].reason


def test_onnx_attention_op(tmp_path):
    a = _analyze(tmp_path, B.onnx_attention_op(with_mask=True))
    (site,) = a.sites
    assert site.op == "Attention" and site.scale == pytest.approx(0.3) and site.bias_kind == "input"
    assert site.verified


@pytest.mark.parametrize("dynamic", [False, True])
def test_causal_onnx_attention(tmp_path, dynamic):
    """is_causal becomes a bias (built from the run-time lengths when they are symbolic); verification
    compares it with onnxruntime's own causal kernel."""
    a = _analyze(tmp_path, B.onnx_attention_op(causal=True, dynamic=dynamic))
    (site,) = a.sites
    assert site.verified and site.bias is not None and not site.bias_per_key
    assert site.bias_kind == ("input" if dynamic else "constant")


def test_ms_multihead_attention(tmp_path):
    a = _analyze(tmp_path, B.ms_multihead_attention())
    (site,) = a.sites
    assert site.op == "com.microsoft.MultiHeadAttention" and site.num_heads == 2
    assert site.scale == pytest.approx(0.5)
    assert site.verified


@pytest.mark.parametrize("mask", ["end", "raw", "raw3"])
def test_contrib_attention_mask_index_becomes_a_bias(tmp_path, mask):
    """Verification runs ORT's own contrib kernel on random masks (0/1 values, end positions 0/1) and
    compares with softmax(scale·QKᵀ + bias)·V: the bias we derive must mean what mask_index means."""
    a = _analyze(tmp_path, B.ms_packed_attention(mask))
    (site,) = a.sites
    assert site.op == "com.microsoft.Attention" and site.bias_kind == "input" and site.verified
    assert site.bias_per_key == (mask != "raw3")


@pytest.mark.parametrize("stable", [True, False])
@pytest.mark.parametrize("opset", [17, 18])
def test_spelled_out_softmax_is_attention(tmp_path, stable, opset):
    from attnrewrite.onnx.canonicalize import canonicalize
    from attnrewrite.onnx.modelio import load_model
    from tests.conftest import ort_run

    model = B.spelled_out_softmax_attention(stable=stable, opset=opset)
    a = _analyze(tmp_path, model)
    (site,) = a.sites
    assert site.op == "Softmax" and site.verified and site.scale == pytest.approx(0.5)
    # canonicalisation replaced the formula by one Softmax without moving the output
    import onnx_ir as ir

    out = tmp_path / "canonical.onnx"
    onnx.save(ir.serde.serialize_model(canonicalize(load_model(tmp_path / "m.onnx"))), out)
    assert [n.op_type for n in onnx.load(out).graph.node].count("Softmax") == 1
    rng = np.random.default_rng(1)
    feeds = {name: rng.standard_normal((1, 2, 6, 4)).astype(np.float32) for name in "qkv"}
    np.testing.assert_allclose(ort_run(out, feeds)["o"], ort_run(tmp_path / "m.onnx", feeds)["o"], atol=1e-6)


def test_spelled_out_softmax_over_another_axis_or_as_output_is_not_attention(tmp_path):
    assert _analyze(tmp_path, B.spelled_out_softmax_attention(axis=-2)).sites == []
    a = _analyze(tmp_path, B.spelled_out_softmax_attention(as_output=True))
    assert a.sites == [] and "model output" in a.detection.rejected[0].reason


@pytest.mark.parametrize("key_padding", ["end", "raw"])
def test_ms_multihead_attention_key_padding_mask(tmp_path, key_padding):
    a = _analyze(tmp_path, B.ms_multihead_attention(key_padding=key_padding, batch=3))
    (site,) = a.sites
    assert site.verified and site.bias_kind == "input" and site.bias_per_key


def test_attention_among_constants_is_rejected_as_constant(tmp_path):
    """DETR's first decoder layer: learned queries attend to each other before any image token arrives."""
    from onnx import helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    inits = [B.init(name, rng.standard_normal((1, 2, 5, 4))) for name in "qk"]
    model = B._model(nodes, [B.f32("v", [1, 2, 5, 4])], [B.f32("o", [1, 2, 5, 4])], inits)
    a = _analyze(tmp_path, model)
    assert a.sites == [] and "both constant" in a.detection.rejected[0].reason


def test_wrong_reading_fails_verification(tmp_path, monkeypatch):
    """If detection misread the scale, the numerical check must reject the site, never pass it."""
    from attnrewrite.onnx.detect import softmax as D

    original = D._logits_chain

    def wrong_scale(*args, **kwargs):
        chain, qk, scale, row_factors = original(*args, **kwargs)
        return chain, qk, scale * 2, row_factors

    monkeypatch.setattr(D, "_logits_chain", wrong_scale)
    a = _analyze(tmp_path, B.plain_attention("const"))
    assert a.sites == []
    assert "relative error" in a.detection.rejected[0].reason


def test_input_file_is_not_modified(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(B.plain_attention("const"), path)
    before = path.read_bytes()
    a = analyze(path)
    assert len(a.sites) == 1 and a.sites[0].verified  # the analysis did its work on that file
    assert path.read_bytes() == before


def test_shape_chain_evaluator_folds_small_values_only():
    """Where/Equal/Expand chains (TorchScript's `expand(B, -1, -1)`) fold; a big ConstantOfShape
    (an [N, N] mask) is left to the runtime instead of being allocated during canonicalisation."""
    import onnx_ir as ir

    from attnrewrite.ir.evaluate import MAX_FOLDED_ELEMENTS, _evaluate

    def ev(op, *args, **attrs):
        node = ir.node(op, [ir.Value(name=f"i{i}") for i in range(len(args))], attributes=attrs)
        return _evaluate(node, [np.asarray(a) for a in args])

    target = np.array([2, -1, -1], np.int64)
    ones = ev("ConstantOfShape", [3], value=ir.tensor(np.array([1], np.int64)))
    mask = ev("Equal", target, ones * -1)
    assert ev("Where", mask, ones, target).tolist() == [2, 1, 1]
    assert ev("Expand", np.zeros((1, 1, 4), np.float32), np.array([2, 1, 1])).shape == (2, 1, 4)
    assert ev("ConstantOfShape", [MAX_FOLDED_ELEMENTS + 1]) is None
    assert ev("Expand", np.zeros((1, 1), np.float32), np.array([MAX_FOLDED_ELEMENTS, 2])) is None
