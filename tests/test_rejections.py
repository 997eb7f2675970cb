"""Every detection rejection a user can meet: the reason text, and the node it names.

`Rejection.node` is the anchor's name, or `"anchor (at culprit)"` when another node made detection
stop (the constant weight of a classifier head, the value product). Each graph names its nodes so the
test can check that the user is pointed at the right one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from attnrewrite.onnx.analysis import analyze
from tests.onnx_builders import _model, f32, init

MS = [("com.microsoft", 1)]


def _rejected(tmp_path, model: onnx.ModelProto):
    """The single rejection of a model that holds no rewritable attention."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    a = analyze(path)
    assert a.sites == [], [s.id for s in a.sites]
    assert len(a.detection.rejected) == 1, a.detection.rejected
    return a.detection.rejected[0]


def _check(rejection, reason: str, node: str) -> None:
    assert reason in rejection.reason, rejection
    assert rejection.node == node, rejection


def _onnx_attention(node, q_shape, kv_shape, out_shape, extra_inputs=(), extra_outputs=()):
    inputs = [f32("q", q_shape), f32("k", kv_shape), f32("v", kv_shape), *extra_inputs]
    return _model([node], inputs, [f32("o", out_shape), *extra_outputs], opset=23)


# --- fused ONNX Attention (opset 23) --------------------------------------------------------------


def test_onnx_attention_with_kv_cache(tmp_path):
    node = helper.make_node("Attention", ["q", "k", "v", "", "past_k", "past_v"], ["o", "present_k", "present_v"],
                            name="decoder.self_attn")
    model = _onnx_attention(node, [1, 2, 4, 8], [1, 2, 4, 8], [1, 2, 4, 8],
                            extra_inputs=[f32("past_k", [1, 2, 3, 8]), f32("past_v", [1, 2, 3, 8])],
                            extra_outputs=[f32("present_k", [1, 2, 7, 8]), f32("present_v", [1, 2, 7, 8])])
    _check(_rejected(tmp_path, model), "KV cache", "decoder.self_attn")


def test_onnx_attention_grouped_query(tmp_path):
    node = helper.make_node("Attention", ["q", "k", "v"], ["o"], name="llama.attn")
    model = _onnx_attention(node, [1, 4, 5, 8], [1, 2, 5, 8], [1, 4, 5, 8])
    _check(_rejected(tmp_path, model), "grouped-query", "llama.attn")


def test_onnx_attention_softcap(tmp_path):
    node = helper.make_node("Attention", ["q", "k", "v"], ["o"], name="gemma.attn", softcap=30.0)
    model = _onnx_attention(node, [1, 2, 5, 8], [1, 2, 5, 8], [1, 2, 5, 8])
    _check(_rejected(tmp_path, model), "softcap", "gemma.attn")


def test_onnx_attention_3d_with_different_head_counts(tmp_path):
    node = helper.make_node("Attention", ["q", "k", "v"], ["o"], name="attn3d", q_num_heads=4, kv_num_heads=2)
    model = _onnx_attention(node, [1, 5, 16], [1, 5, 8], [1, 5, 16])
    _check(_rejected(tmp_path, model), "q_num_heads == kv_num_heads", "attn3d")


def test_onnx_attention_whose_qk_output_is_used(tmp_path):
    node = helper.make_node("Attention", ["q", "k", "v"], ["o", "", "", "qk"], name="attn_qk")
    model = _onnx_attention(node, [1, 2, 5, 8], [1, 2, 5, 8], [1, 2, 5, 8], extra_outputs=[f32("qk", [1, 2, 5, 5])])
    _check(_rejected(tmp_path, model), "QK outputs are used", "attn_qk")


# --- com.microsoft contrib ops ----------------------------------------------------------------------


def _packed(node_kwargs, inputs=("x", "W", "b"), extra=()):
    rng = np.random.default_rng(0)
    node = helper.make_node("Attention", list(inputs), ["o"], domain="com.microsoft", num_heads=2, **node_kwargs)
    return _model([node], [f32("x", [1, 5, 8]), *extra], [f32("o", [1, 5, 8])],
                  [init("W", rng.standard_normal((8, 24))), init("b", np.zeros(24))], extra_opsets=MS)


def test_contrib_attention_unidirectional(tmp_path):
    model = _packed({"name": "gpt2.attn", "unidirectional": 1})
    _check(_rejected(tmp_path, model), "unidirectional", "gpt2.attn")


def test_contrib_attention_with_past_state(tmp_path):
    model = _packed({"name": "gpt2.past"}, inputs=("x", "W", "b", "", "past"), extra=[f32("past", [2, 1, 2, 3, 4])])
    _check(_rejected(tmp_path, model), "past state", "gpt2.past")


def test_contrib_attention_with_uneven_qkv_sizes(tmp_path):
    model = _packed({"name": "uneven", "qkv_hidden_sizes": [8, 8, 8]})
    _check(_rejected(tmp_path, model), "qkv_hidden_sizes", "uneven")


def test_contrib_multihead_attention_with_kv_cache(tmp_path):
    names = ["q", "k", "v", "", "", "", "past_k", "past_v"]
    node = helper.make_node("MultiHeadAttention", names, ["o"], domain="com.microsoft", num_heads=2, name="mha_cache")
    inputs = [f32("q", [1, 5, 8]), f32("k", [1, 5, 8]), f32("v", [1, 5, 8]), f32("past_k", [1, 2, 3, 4]),
              f32("past_v", [1, 2, 3, 4])]
    model = _model([node], inputs, [f32("o", [1, 5, 8])], extra_opsets=MS)
    _check(_rejected(tmp_path, model), "KV cache", "mha_cache")


# --- softmaxes that are not attention ---------------------------------------------------------------


def test_classifier_head_names_its_constant_weight(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"], name="head.fc"),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="head.softmax")]
    model = _model(nodes, [f32("x", [2, 16])], [f32("probs", [2, 10])], [init("W", rng.standard_normal((16, 10)))])
    _check(_rejected(tmp_path, model), "constant W", "head.softmax (at head.fc)")


def test_moe_gate_names_its_constant_weight(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "Wg"], ["gl"], name="moe.gate"),
        helper.make_node("Softmax", ["gl"], ["gate"], axis=-1, name="moe.softmax"),
        helper.make_node("Unsqueeze", ["gate", "ax"], ["g4"], name="moe.unsqueeze"),
        helper.make_node("MatMul", ["x", "We"], ["ex"], name="moe.experts"),
        helper.make_node("Reshape", ["ex", "shp"], ["ex4"], name="moe.reshape"),
        helper.make_node("MatMul", ["g4", "ex4"], ["mix"], name="moe.mix"),
    ]
    inits = [init("Wg", rng.standard_normal((8, 4))), init("We", rng.standard_normal((8, 32))),
             onnx.numpy_helper.from_array(np.array([2, 5, 4, 8], np.int64), "shp"),
             onnx.numpy_helper.from_array(np.array([2], np.int64), "ax")]
    model = _model(nodes, [f32("x", [2, 5, 8])], [f32("mix", [2, 5, 1, 8])], inits)
    _check(_rejected(tmp_path, model), "constant W", "moe.softmax (at moe.gate)")


def _qk_softmax(after_softmax, outputs, inits=(), axis=-1, extra_inputs=()):
    """q·kᵀ → Softmax(axis) named "attn.softmax", then `after_softmax` nodes."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="attn.kt"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="attn.qk"),
             helper.make_node("Softmax", ["s"], ["p"], axis=axis, name="attn.softmax"), *after_softmax]
    inputs = [f32("q", [1, 2, 5, 4]), f32("k", [1, 2, 5, 4]), *extra_inputs]
    return _model(nodes, inputs, outputs, list(inits))


def test_softmax_weights_applied_to_a_constant(tmp_path):
    rng = np.random.default_rng(0)
    model = _qk_softmax([helper.make_node("MatMul", ["p", "C"], ["o"], name="attn.pv")], [f32("o", [1, 2, 5, 4])],
                        [init("C", rng.standard_normal((5, 4)))])
    _check(_rejected(tmp_path, model), "constant, not a value tensor", "attn.softmax (at attn.pv)")


def test_softmax_over_the_query_axis(tmp_path):
    model = _qk_softmax([helper.make_node("MatMul", ["p", "v"], ["o"], name="attn.pv")], [f32("o", [1, 2, 5, 4])],
                        axis=2, extra_inputs=[f32("v", [1, 2, 5, 4])])
    _check(_rejected(tmp_path, model), "not the last (key) axis", "attn.softmax")


def test_softmax_output_is_a_model_output(tmp_path):
    model = _qk_softmax([], [f32("p", [1, 2, 5, 5])])
    _check(_rejected(tmp_path, model), "model output", "attn.softmax")


def test_softmax_output_feeds_something_else(tmp_path):
    model = _qk_softmax([helper.make_node("Relu", ["p"], ["o"], name="attn.relu")], [f32("o", [1, 2, 5, 5])])
    _check(_rejected(tmp_path, model), "feeds Relu, not a MatMul with values", "attn.softmax")


def test_logits_from_an_unknown_op(tmp_path):
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="attn.kt"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="attn.qk"),
             helper.make_node("Tanh", ["s"], ["st"], name="attn.tanh"),
             helper.make_node("Softmax", ["st"], ["p"], axis=-1, name="attn.softmax"),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="attn.pv")]
    shape = [1, 2, 5, 4]
    model = _model(nodes, [f32("q", shape), f32("k", shape), f32("v", shape)], [f32("o", shape)])
    _check(_rejected(tmp_path, model), "logits come from Tanh", "attn.softmax (at attn.tanh)")


def test_soft_capped_logits_behind_a_mask_name_the_tanh(tmp_path):
    """Gemma 2: `tanh(s / cap) · cap + mask`. The Add has no operand that reaches Q·Kᵀ through affine
    ops; the rejection names the Tanh that blocks it, not the Add."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="attn.kt"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="attn.qk"),
             helper.make_node("Div", ["s", "cap"], ["sc"], name="attn.div_cap"),
             helper.make_node("Tanh", ["sc"], ["st"], name="attn.tanh"),
             helper.make_node("Mul", ["st", "cap"], ["sm"], name="attn.mul_cap"),
             helper.make_node("Add", ["sm", "mask"], ["sa"], name="attn.mask"),
             helper.make_node("Softmax", ["sa"], ["p"], axis=-1, name="attn.softmax"),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="attn.pv")]
    shape = [1, 2, 5, 4]
    inits = [onnx.numpy_helper.from_array(np.array(50.0, np.float32), "cap")]
    model = _model(nodes, [f32("q", shape), f32("k", shape), f32("v", shape), f32("mask", [1, 1, 5, 5])],
                   [f32("o", shape)], inits)
    _check(_rejected(tmp_path, model), "pass through Tanh", "attn.softmax (at attn.tanh)")


@pytest.mark.parametrize("anchor", ["Softmax", "Attention"])
def test_unnamed_nodes_are_named_by_op_type(tmp_path, anchor):
    """Exporters leave names empty sometimes: the op type stands in, so the message is never blank."""
    if anchor == "Attention":
        model = _onnx_attention(helper.make_node("Attention", ["q", "k", "v"], ["o"], softcap=5.0),
                                [1, 2, 5, 8], [1, 2, 5, 8], [1, 2, 5, 8])
        _check(_rejected(tmp_path, model), "softcap", "Attention")
    else:
        rng = np.random.default_rng(0)
        nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"])]
        model = _model(nodes, [f32("x", [2, 16])], [f32("probs", [2, 10])], [init("W", rng.standard_normal((16, 10)))])
        _check(_rejected(tmp_path, model), "constant W", "Softmax (at MatMul)")
