"""Hand-written ONNX graphs for detection edge cases no exporter gives us on demand."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def classifier_softmax(seed=0):
    """x·W → Softmax over classes, a model output: not attention."""
    rng = np.random.default_rng(seed)
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        [f32("x", [2, 16])], [f32("probs", [2, 10])], [init("W", rng.standard_normal((16, 10)))],
    )


def moe_gate(seed=0):
    """gate = softmax(x·Wg) over experts, combined with expert outputs by a dynamic MatMul: not attention."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "Wg"], ["gl"]),
        helper.make_node("Softmax", ["gl"], ["gate"], axis=-1),  # [B, T, E]
        helper.make_node("MatMul", ["x", "We"], ["ex"]),  # [B, T, E*D]
        helper.make_node("Reshape", ["ex", "shp"], ["ex4"]),  # [B, T, E, D]
        helper.make_node("Unsqueeze", ["gate", "ax"], ["g4"]),  # [B, T, 1, E]
        helper.make_node("MatMul", ["g4", "ex4"], ["mix"]),  # [B, T, 1, D]
    ]
    inits = [init("Wg", rng.standard_normal((8, 4))), init("We", rng.standard_normal((8, 4 * 8))),
             numpy_helper.from_array(np.array([2, 5, 4, 8], np.int64), "shp"),
             numpy_helper.from_array(np.array([2], np.int64), "ax")]
    return _model(nodes, [f32("x", [2, 5, 8])], [f32("mix", [2, 5, 1, 8])], inits)


def plain_attention(bias: str = "none", seed=0, heads=2, n=6, d=4, opset=17, project=False, self_attention=False):
    """Softmax(Q·Kᵀ·s + B)·V written the way a hand exporter would; bias none|zero|const|input.

    `project=True` adds an output projection, so the attention output is not itself a model output.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
    ]
    inputs = [f32("q", [1, heads, n, d]), f32("k", [1, heads, n, d]), f32("v", [1, heads, n, d])]
    inits = [init("scale", 0.5)]
    if self_attention:  # q, k, v projected from one token stream x
        inputs = [f32("x", [1, heads, n, d])]
        for name in "qkv":
            inits.append(init("W" + name, rng.standard_normal((d, d)) * 1.5))
            nodes.insert(0, helper.make_node("MatMul", ["x", "W" + name], [name]))
    logits = "ss"
    if bias in ("zero", "const"):
        arr = np.zeros((heads, n, n)) if bias == "zero" else rng.standard_normal((heads, n, n))
        inits.append(init("B", arr))
        nodes.append(helper.make_node("Add", ["ss", "B"], ["sb"]))
        logits = "sb"
    elif bias == "input":
        inputs.append(f32("mask", [1, 1, 1, n]))
        nodes.append(helper.make_node("Add", ["ss", "mask"], ["sb"]))
        logits = "sb"
    nodes += [helper.make_node("Softmax", [logits], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    if project:
        inits.append(init("Wo", rng.standard_normal((d, d))))
        nodes.append(helper.make_node("MatMul", ["o", "Wo"], ["y"]))
        return _model(nodes, inputs, [f32("y", [1, heads, n, d])], inits, opset=opset)
    return _model(nodes, inputs, [f32("o", [1, heads, n, d])], inits, opset=opset)


def onnx_attention_op(n=6, heads=2, d=4, with_mask=False):
    inputs = [f32("q", [1, heads, n, d]), f32("k", [1, heads, n, d]), f32("v", [1, heads, n, d])]
    names = ["q", "k", "v"]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("m", TensorProto.BOOL, [1, 1, n, n]))
        names.append("m")
    node = helper.make_node("Attention", names, ["o"], scale=0.3)
    return _model([node], inputs, [f32("o", [1, heads, n, d])], opset=23)


def ms_multihead_attention(n=6, heads=2, d=4):
    hidden = heads * d
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=heads)
    return _model([node], [f32("q", [1, n, hidden]), f32("k", [1, n, hidden]), f32("v", [1, n, hidden])],
                  [f32("o", [1, n, hidden])], extra_opsets=[("com.microsoft", 1)])


def tiny_vit(depth=2, img=(16, 16), patch=4, dim=16, heads=2, prefix=1, classes=5, seed=0, sharpen=4.0, opset=17,
             dynamic_batch=True):
    """A pure-ONNX timm-style ViT (Conv patch embed, prefix tokens, pre-norm blocks), no torch needed.

    Q/K weights are scaled by `sharpen` so attention is far from uniform and broken rewrites show.
    """
    rng = np.random.default_rng(seed)
    gh, gw = img[0] // patch, img[1] // patch
    n = prefix + gh * gw
    d = dim // heads
    batch = "batch" if dynamic_batch else 1
    inits = [
        init("patch_w", rng.standard_normal((dim, 3, patch, patch)) * 0.2), init("patch_b", np.zeros(dim)),
        init("prefix_tok", rng.standard_normal((1, prefix, dim))), init("pos", rng.standard_normal((1, n, dim)) * 0.1),
        init("head_w", rng.standard_normal((dim, classes)) * 0.5),
        numpy_helper.from_array(np.array([0, dim, -1], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([0, n, 3, heads, d], np.int64), "qkv_shape"),
        numpy_helper.from_array(np.array([0, n, dim], np.int64), "merge_shape"),
        numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array(1, np.int64), "i1"),
        numpy_helper.from_array(np.array(2, np.int64), "i2"), init("scale", d ** -0.5),
        init("ln_g", np.ones(dim)), init("ln_b", np.zeros(dim)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "patch_w", "patch_b"], ["pe"], kernel_shape=[patch, patch], strides=[patch, patch]),
        helper.make_node("Reshape", ["pe", "flat_shape"], ["pf"]),
        helper.make_node("Transpose", ["pf"], ["tok"], perm=[0, 2, 1]),
        helper.make_node("Shape", ["x"], ["xs"], end=1),
        helper.make_node("Concat", ["xs", "pre_dims"], ["pre_shape"], axis=0),
        helper.make_node("Expand", ["prefix_tok", "pre_shape"], ["pre"]),
        helper.make_node("Concat", ["pre", "tok"], ["cat"], axis=1),
        helper.make_node("Add", ["cat", "pos"], ["h0"]),
    ]
    inits.append(numpy_helper.from_array(np.array([prefix, dim], np.int64), "pre_dims"))
    h = "h0"
    for layer in range(depth):
        p = f"l{layer}_"
        wqkv = rng.standard_normal((dim, 3 * dim)) / np.sqrt(dim)
        wqkv[:, : 2 * dim] *= sharpen
        inits += [init(p + "wqkv", wqkv), init(p + "wo", rng.standard_normal((dim, dim)) / np.sqrt(dim)),
                  init(p + "w1", rng.standard_normal((dim, 2 * dim)) / np.sqrt(dim)),
                  init(p + "w2", rng.standard_normal((2 * dim, dim)) / np.sqrt(2 * dim))]
        nodes += [
            helper.make_node("LayerNormalization", [h, "ln_g", "ln_b"], [p + "ln"], axis=-1),
            helper.make_node("MatMul", [p + "ln", p + "wqkv"], [p + "qkv"]),
            helper.make_node("Reshape", [p + "qkv", "qkv_shape"], [p + "qkv5"]),
            helper.make_node("Transpose", [p + "qkv5"], [p + "qkvt"], perm=[2, 0, 3, 1, 4]),
            helper.make_node("Gather", [p + "qkvt", "i0"], [p + "q"], axis=0),
            helper.make_node("Gather", [p + "qkvt", "i1"], [p + "k"], axis=0),
            helper.make_node("Gather", [p + "qkvt", "i2"], [p + "v"], axis=0),
            helper.make_node("Mul", [p + "q", "scale"], [p + "qs"]),
            helper.make_node("Transpose", [p + "k"], [p + "kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [p + "qs", p + "kt"], [p + "logits"]),
            helper.make_node("Softmax", [p + "logits"], [p + "attn"], axis=-1),
            helper.make_node("MatMul", [p + "attn", p + "v"], [p + "o"]),
            helper.make_node("Transpose", [p + "o"], [p + "ot"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "ot", "merge_shape"], [p + "om"]),
            helper.make_node("MatMul", [p + "om", p + "wo"], [p + "proj"]),
            helper.make_node("Add", [h, p + "proj"], [p + "r1"]),
            helper.make_node("LayerNormalization", [p + "r1", "ln_g", "ln_b"], [p + "ln2"], axis=-1),
            helper.make_node("MatMul", [p + "ln2", p + "w1"], [p + "m1"]),
            helper.make_node("Relu", [p + "m1"], [p + "m1r"]),
            helper.make_node("MatMul", [p + "m1r", p + "w2"], [p + "m2"]),
            helper.make_node("Add", [p + "r1", p + "m2"], [p + "out"]),
        ]
        h = p + "out"
    nodes += [
        helper.make_node("Gather", [h, "i0"], ["cls"], axis=1),
        helper.make_node("MatMul", ["cls", "head_w"], ["logits"]),
    ]
    return _model(nodes, [f32("x", [batch, 3, img[0], img[1]])], [f32("logits", [batch, classes])], inits, opset=opset)
