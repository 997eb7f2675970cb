"""Hand-written ONNX graphs for detection edge cases no exporter gives us on demand."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from attnrewrite.synthetic import vit as synthetic_vit


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


def plain_attention(bias: str = "none", seed=0, heads=2, n=6, d=4, opset=17, project=False, self_attention=False,
                    logit_factor: str = "none", dtype=np.float32):
    """Softmax(Q·Kᵀ·s + B)·V written the way a hand exporter would; bias none|zero|const|row_shift|input
    (row_shift: the same value for every key of a row, which softmax ignores).

    `project=True` adds an output projection, so the attention output is not itself a model output.
    `logit_factor` multiplies the logits by a constant tensor: "per_head" ([h, 1, 1], Swin V2's
    temperature), "per_query" ([n, 1]) or "per_key" ([n]), the last of which is not a scale of Q.
    `dtype` is the float type of every input, weight and output (float32, float16).
    """
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def f32(name, shape):  # noqa: F811 - this builder's own float type
        return helper.make_tensor_value_info(name, elem, shape)

    def init(name, array):  # noqa: F811
        return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)

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
    if logit_factor != "none":
        shape = {"per_head": (heads, 1, 1), "per_query": (n, 1), "per_key": (n,)}[logit_factor]
        inits.append(init("T", np.linspace(0.5, 3.0, int(np.prod(shape))).reshape(shape)))
        nodes.append(helper.make_node("Mul", ["T", "ss"], ["st"]))
        logits = "st"
    if bias in ("zero", "const", "row_shift"):
        arr = {"zero": np.zeros((heads, n, n)), "const": rng.standard_normal((heads, n, n)),
               "row_shift": np.repeat(rng.standard_normal((heads, n, 1)), n, axis=-1)}[bias]
        inits.append(init("B", arr))
        nodes.append(helper.make_node("Add", [logits, "B"], ["sb"]))
        logits = "sb"
    elif bias == "input":
        inputs.append(f32("mask", [1, 1, 1, n]))
        nodes.append(helper.make_node("Add", [logits, "mask"], ["sb"]))
        logits = "sb"
    nodes += [helper.make_node("Softmax", [logits], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    if project:
        inits.append(init("Wo", rng.standard_normal((d, d))))
        nodes.append(helper.make_node("MatMul", ["o", "Wo"], ["y"]))
        return _model(nodes, inputs, [f32("y", [1, heads, n, d])], inits, opset=opset)
    return _model(nodes, inputs, [f32("o", [1, heads, n, d])], inits, opset=opset)


def onnx_attention_op(n=6, heads=2, d=4, with_mask=False, causal=False, dynamic=False):
    """ONNX Attention (opset 23); `dynamic` makes the token axis symbolic ("T")."""
    t = "T" if dynamic else n
    inputs = [f32("q", [1, heads, t, d]), f32("k", [1, heads, t, d]), f32("v", [1, heads, t, d])]
    names = ["q", "k", "v"]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("m", TensorProto.BOOL, [1, 1, t, t]))
        names.append("m")
    node = helper.make_node("Attention", names, ["o"], scale=0.3, is_causal=int(causal))
    return _model([node], inputs, [f32("o", [1, heads, t, d])], opset=23)


def ms_multihead_attention(n=6, heads=2, d=4, key_padding: str | None = None, batch=1):
    """com.microsoft MultiHeadAttention; `key_padding`: None, "end" ([B] end positions) or "raw" ([B, N] 0/1)."""
    hidden = heads * d
    names = ["q", "k", "v"]
    inputs = [f32("q", [batch, n, hidden]), f32("k", [batch, n, hidden]), f32("v", [batch, n, hidden])]
    if key_padding:
        names += ["", "kpm"]
        shape = [batch] if key_padding == "end" else [batch, n]
        inputs.append(helper.make_tensor_value_info("kpm", TensorProto.INT32, shape))
    node = helper.make_node("MultiHeadAttention", names, ["o"], domain="com.microsoft", num_heads=heads)
    return _model([node], inputs, [f32("o", [batch, n, hidden])], extra_opsets=[("com.microsoft", 1)])


def ms_packed_attention(mask: str, n=6, heads=2, d=4, batch=3, seed=0):
    """com.microsoft Attention (packed QKV weights) with a mask_index: "end" = [B] end positions,
    "raw" = [B, N] 0/1 mask, "raw3" = [B, N, N]; the op's own kernel defines what they mean."""
    rng = np.random.default_rng(seed)
    hidden = heads * d
    shape = {"end": [batch], "raw": [batch, n], "raw3": [batch, n, n]}[mask]
    node = helper.make_node("Attention", ["x", "W", "b", "mask"], ["o"], domain="com.microsoft", num_heads=heads,
                            mask_filter_value=-5000.0)
    return _model([node], [f32("x", [batch, n, hidden]), helper.make_tensor_value_info("mask", TensorProto.INT32, shape)],
                  [f32("o", [batch, n, hidden])],
                  [init("W", rng.standard_normal((hidden, 3 * hidden))), init("b", rng.standard_normal(3 * hidden))],
                  extra_opsets=[("com.microsoft", 1)])


def spelled_out_softmax_attention(stable=True, opset=17, axis=-1, as_output=False, n=6, heads=2, d=4):
    """softmax written as Exp(x − ReduceMax x) / ReduceSum(Exp …) (ORT's fp16 CPU inlining, converters).

    `axis` is the reduction axis (-1 is softmax; -2 is not); `as_output` makes the normalised weights
    the model output (a classifier-like softmax, not attention)."""
    def reduce(op, x, out):
        if opset >= 18 or op == "ReduceSum":
            return helper.make_node(op, [x, "ax"], [out], keepdims=1)
        return helper.make_node(op, [x], [out], keepdims=1, axes=[axis])
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Mul", ["s", "scale"], ["x"])]
    if stable:
        nodes += [reduce("ReduceMax", "x", "m"), helper.make_node("Sub", ["x", "m"], ["xs"])]
    nodes += [helper.make_node("Exp", ["xs" if stable else "x"], ["e"]), reduce("ReduceSum", "e", "z"),
              helper.make_node("Div", ["e", "z"], ["p"])]
    inits = [init("scale", 0.5), numpy_helper.from_array(np.array([axis], np.int64), "ax")]
    inputs = [f32("q", [1, heads, n, d]), f32("k", [1, heads, n, d]), f32("v", [1, heads, n, d])]
    if as_output:
        return _model(nodes, inputs, [f32("p", [1, heads, n, n])], inits, opset=opset)
    nodes.append(helper.make_node("MatMul", ["p", "v"], ["o"]))
    return _model(nodes, inputs, [f32("o", [1, heads, n, d])], inits, opset=opset)


tiny_vit = synthetic_vit
