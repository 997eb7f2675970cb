"""Synthetic models built directly in ONNX (no torch): demos, benchmarks and tests.

`vit` writes a timm-style ViT the way the TorchScript exporter does (Conv patch embedding with
stride = kernel, prefix tokens concatenated in front, pre-norm blocks, `q * scale @ kᵀ`), with random
weights. Q/K weights are scaled by `sharpen` so attention is far from uniform, which makes a broken
or lossy rewrite visible in the drift numbers.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def vit(depth=2, img=(16, 16), patch=4, dim=16, heads=2, prefix=1, classes=5, seed=0, sharpen=4.0, opset=17,
        dynamic_batch=True, mlp_ratio=2):
    """A pure-ONNX timm-style ViT (Conv patch embed, prefix tokens, pre-norm blocks), no torch needed.

    Q/K weights are scaled by `sharpen` so attention is far from uniform and broken rewrites show.
    """
    rng = np.random.default_rng(seed)
    gh, gw = img[0] // patch, img[1] // patch
    n = prefix + gh * gw
    d = dim // heads
    batch = "batch" if dynamic_batch else 1
    inits = [
        _init("patch_w", rng.standard_normal((dim, 3, patch, patch)) * 0.2), _init("patch_b", np.zeros(dim)),
        _init("prefix_tok", rng.standard_normal((1, prefix, dim))), _init("pos", rng.standard_normal((1, n, dim)) * 0.1),
        _init("head_w", rng.standard_normal((dim, classes)) * 0.5),
        numpy_helper.from_array(np.array([0, dim, -1], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([0, n, 3, heads, d], np.int64), "qkv_shape"),
        numpy_helper.from_array(np.array([0, n, dim], np.int64), "merge_shape"),
        numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array(1, np.int64), "i1"),
        numpy_helper.from_array(np.array(2, np.int64), "i2"), _init("scale", d ** -0.5),
        _init("ln_g", np.ones(dim)), _init("ln_b", np.zeros(dim)),
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
        inits += [_init(p + "wqkv", wqkv), _init(p + "wo", rng.standard_normal((dim, dim)) / np.sqrt(dim)),
                  _init(p + "w1", rng.standard_normal((dim, mlp_ratio * dim)) / np.sqrt(dim)),
                  _init(p + "w2", rng.standard_normal((mlp_ratio * dim, dim)) / np.sqrt(mlp_ratio * dim))]
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
    graph = helper.make_graph(nodes, "vit", [_f32("x", [batch, 3, img[0], img[1]])], [_f32("logits", [batch, classes])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def lone_site(batch, heads: int, tokens: int, head_dim: int, *, scale: float, grid=None, prefix=None, suffix: int = 0,
              bias_dims=None):
    """An empty graph whose inputs are one site's Q, K, V `[B, h, N, d]` (and a key-padding bias when
    `bias_dims` is given), with the `AttentionSite` that describes them: a pass plans, fits and
    rewrites it exactly as it would inside a model. For emitter tests and per-site benchmarks."""
    import onnx_ir as ir

    from attnrewrite.site import AttentionSite, SiteInfo

    f32 = ir.TensorType(ir.DataType.FLOAT)
    q, k, v = (ir.Value(name=x, shape=ir.Shape([batch, heads, tokens, head_dim]), type=f32) for x in "qkv")
    bias = ir.Value(name="bias", shape=ir.Shape(bias_dims), type=f32) if bias_dims is not None else None
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": 17, "com.microsoft": 1}, name="site")
    info = SiteInfo(op="Softmax", num_heads=heads, head_dim=head_dim, q_len=tokens, kv_len=tokens, scale=scale,
                    bias_kind="input" if bias is not None else "none", bias_per_key=True, kind="self", instances=1,
                    window=None, grid=grid, prefix_tokens=prefix, suffix_tokens=suffix, rotary=False,
                    output_layout="bhnd", vision=grid is not None)
    site = AttentionSite(id="attn_0", info=info, anchor=None, q=q, k=k, v=v, output=None, bias=bias, nodes=())
    return graph, site
