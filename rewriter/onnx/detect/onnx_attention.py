"""The ONNX `Attention` op (opset 23): what torch's dynamo exporter writes for SDPA."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from attnrewrite.ir.evaluate import evaluate_constant
from attnrewrite.ir.graph import (
    add_constant,
    add_node,
    dims,
    is_constant,
)
from attnrewrite.onnx.detect.reading import Reading, Reject, query_invariant, split_heads, value_rank


def read_onnx_attention(graph: ir.Graph, node: ir.Node) -> Reading:
    """ONNX `Attention` (opset 23): Q/K/V 4-D `[B,h,N,d]` or 3-D `[B,N,h·d]` with head-count attrs."""
    attrs = node.attributes
    q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
    extra = [i for i in node.inputs[4:] if i is not None]
    if extra:
        raise Reject("Attention with a KV cache or sequence lengths is not rewritten", node)
    if attrs.get("softcap") is not None and attrs["softcap"].value != 0:
        raise Reject("Attention with softcap is not rewritten", node)
    if len(node.outputs) > 1 and any(o.consumers() or o.is_graph_output() for o in node.outputs[1:] if o is not None):
        raise Reject("Attention's cache or QK outputs are used; the fused op must stay", node)
    rank = value_rank(q)
    if rank == 4:
        q4, k4, v4, layout = q, k, v, "bhnd"
        heads = dims(q)[1]
        if dims(k)[1] != heads:
            raise Reject("grouped-query attention (fewer K/V heads than Q heads) is not rewritten", node)
    elif rank == 3:
        heads = attrs["q_num_heads"].value if "q_num_heads" in attrs else None
        kv_heads = attrs["kv_num_heads"].value if "kv_num_heads" in attrs else heads
        if heads is None or kv_heads != heads:
            raise Reject("3-D Attention needs q_num_heads == kv_num_heads", node)
        q4, k4, v4 = (split_heads(graph, t, heads) for t in (q, k, v))
        layout = "merge_heads"
    else:
        raise Reject(f"Attention with rank-{rank} inputs", node)
    head_dim = dims(q4)[3]
    scale = attrs["scale"].value if "scale" in attrs else (1.0 / math.sqrt(head_dim) if head_dim else None)
    if scale is None:
        raise Reject("head dim unknown, so the default scale is unknown", node)
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    bias, kind = None, "none"
    causal = attrs["is_causal"].value if "is_causal" in attrs else 0
    dtype = q.dtype or ir.DataType.FLOAT
    if mask is not None:
        bias = _mask_to_bias(graph, mask, dtype)
        kind = "constant" if is_constant(mask) else "input"
        if kind == "constant":
            arr = evaluate_constant(bias)
            if arr is not None and (arr.ndim == 0 or np.all(arr == arr[..., :1])):
                bias, kind = None, "none"  # zero, or a shift softmax ignores
            elif arr is not None:
                bias = add_constant(graph, arr, "bias_const")
    if causal:
        qd, kd = dims(q4), dims(k4)
        if qd[2] is None or kd[2] is None:
            c = _dynamic_causal_bias(graph, q4, k4, dtype)
            kind = "input"  # built from the run-time lengths
        else:
            c = add_constant(graph, np.triu(np.full((qd[2], kd[2]), -np.inf, dtype.numpy()), 1), "causal")
            kind = "input" if kind == "input" else "constant"
        bias = c if bias is None else add_node(graph, "Add", [bias, c], name="bias")
    qd, kd = dims(q4), dims(k4)
    return Reading(
        op="Attention", anchor=node, q=q4, k=k4, v=v4, output=node.outputs[0], num_heads=heads,
        head_dim=head_dim, q_len=qd[2], kv_len=kd[2], scale=float(scale), bias=bias, bias_kind=kind,
        bias_per_key=bias is None or query_invariant(bias), nodes=(node,), output_layout=layout,
    )


def _dynamic_causal_bias(graph: ir.Graph, q4: ir.Value, k4: ir.Value, dtype: ir.DataType) -> ir.Value:
    """`is_causal` for lengths known only at run time: −inf above the diagonal of `[Nq, Nk]`
    (upper-left aligned, as the static form and onnxruntime's Attention kernel)."""
    lengths = [add_node(graph, "Shape", [x], {"start": 2, "end": 3}, name="causal_len") for x in (q4, k4)]
    shape = add_node(graph, "Concat", lengths, {"axis": 0}, name="causal_shape")
    ones = add_node(graph, "ConstantOfShape", [shape], {"value": ir.tensor(np.array([1], np.int32))}, name="causal")
    future = add_node(graph, "Cast", [add_node(graph, "Trilu", [ones, add_constant(graph, np.array(1, np.int64), "k")],
                                               {"upper": 1}, name="causal")], {"to": ir.DataType.BOOL}, name="causal")
    bias = add_node(graph, "Where", [future, add_constant(graph, np.array(-np.inf, dtype.numpy()), "neg_inf"),
                                     add_constant(graph, np.zeros((), dtype.numpy()), "zero")], name="causal_bias")
    bias.type, bias.shape = ir.TensorType(dtype), ir.Shape([q4.shape[2], k4.shape[2]])
    return bias


def _mask_to_bias(graph: ir.Graph, mask: ir.Value, dtype: ir.DataType) -> ir.Value:
    """ONNX Attention's boolean `attn_mask` (True = attend) as an additive bias in the site's float type."""
    if mask.dtype != ir.DataType.BOOL:
        return mask
    zero = add_constant(graph, np.zeros((), dtype.numpy()), "zero")
    neg = add_constant(graph, np.array(-np.inf, dtype.numpy()), "neg_inf")
    bias = add_node(graph, "Where", [mask, zero, neg], name="mask_bias")
    bias.type, bias.shape = ir.TensorType(dtype), mask.shape
    return bias
