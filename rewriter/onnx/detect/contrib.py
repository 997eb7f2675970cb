"""onnxruntime's contrib ops: `com.microsoft` MultiHeadAttention and Attention (packed projection),
as the transformer optimizer writes them, with their `mask_index` encodings."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from attnrewrite.ir.graph import (
    add_constant,
    add_node,
    const_array,
    dims,
    is_constant,
)
from attnrewrite.onnx.detect.reading import Reading, Reject, axes_input, query_invariant, split_heads, typed, value_rank


def read_contrib(graph: ir.Graph, node: ir.Node) -> Reading:
    """com.microsoft MultiHeadAttention (separate Q/K/V) and Attention (packed input projection)."""
    attrs = node.attributes
    heads = attrs["num_heads"].value
    if attrs.get("unidirectional") is not None and attrs["unidirectional"].value:
        raise Reject("unidirectional (causal) contrib attention is not rewritten", node)
    if node.op_type == "MultiHeadAttention":
        ins = list(node.inputs) + [None] * 8
        q, k, v, proj_bias, kpm, attn_bias = ins[:6]
        mask_index = kpm  # same encodings as Attention's mask_index ([B] end positions, [B, Nk] 0/1)
        if any(i is not None for i in ins[6:8]):
            raise Reject("MultiHeadAttention with a KV cache is not rewritten", node)
        if k is None or v is None or value_rank(k) != 3:
            raise Reject("packed or pre-split K/V in MultiHeadAttention is not rewritten", node)
        if proj_bias is not None:
            parts = _split_bias(graph, proj_bias, 3)
            q, k, v = (add_node(graph, "Add", [t, b], name="proj_bias") for t, b in zip((q, k, v), parts))
            for t, ref in zip((q, k, v), node.inputs[:3]):
                t.shape, t.type = ref.shape, ref.type
    else:
        ins = list(node.inputs) + [None] * 8
        x, w, b, mask_index, past, attn_bias = ins[:6]
        if past is not None or any(i is not None for i in ins[6:]):
            raise Reject("contrib Attention with past state is not rewritten", node)
        if "qkv_hidden_sizes" in attrs:
            raise Reject("contrib Attention with uneven qkv_hidden_sizes is not rewritten", node)
        w_arr = const_array(w) if w is not None else None
        if w_arr is None:
            try:
                w_arr = w.const_value.numpy()
            except Exception:  # noqa: BLE001
                raise Reject("contrib Attention weights are not constant", node) from None
        hidden = w_arr.shape[1] // 3
        if x.shape is None:  # contrib producers (EmbedLayerNormalization) get no inferred shape or type
            x.shape = ir.Shape([None, None, w_arr.shape[0]])
        if x.type is None:
            x.type = ir.TensorType(ir.DataType.from_numpy(w_arr.dtype))
        out = node.outputs[0]
        if out.type is None or out.shape is None:  # the validation copy exposes it as an output
            out.type, out.shape = x.type, ir.Shape([x.shape[0], x.shape[1], w_arr.shape[1] // 3])
        b_arr = const_array(b) if b is not None else np.zeros(3 * hidden, w_arr.dtype)
        outs = []
        for i in range(3):
            wi = add_constant(graph, w_arr[:, i * hidden:(i + 1) * hidden], "qkv_w")
            bi = add_constant(graph, b_arr[i * hidden:(i + 1) * hidden], "qkv_b")
            t = add_node(graph, "Add", [add_node(graph, "MatMul", [x, wi], name="qkv"), bi], name="qkv")
            t.shape = ir.Shape([x.shape[0], x.shape[1], hidden])
            t.type = x.type
            outs.append(t)
        q, k, v = outs
    q4, k4, v4 = (split_heads(graph, t, heads) for t in (q, k, v))
    head_dim = dims(q4)[3]
    scale = attrs["scale"].value if "scale" in attrs and attrs["scale"].value != 0 else 1.0 / math.sqrt(head_dim)
    bias = attn_bias
    if mask_index is not None:
        filter_value = attrs["mask_filter_value"].value if "mask_filter_value" in attrs else -10000.0
        mask_bias = _mask_index_bias(graph, mask_index, k, filter_value, node)
        bias = mask_bias if bias is None else add_node(graph, "Add", [bias, mask_bias], name="mask_plus_bias")
    kind = "none" if bias is None else ("constant" if is_constant(bias) else "input")
    qd, kd = dims(q4), dims(k4)
    return Reading(
        op=f"com.microsoft.{node.op_type}", anchor=node, q=q4, k=k4, v=v4, output=node.outputs[0],
        num_heads=heads, head_dim=head_dim, q_len=qd[2], kv_len=kd[2], scale=float(scale), bias=bias,
        bias_kind=kind, bias_per_key=bias is None or query_invariant(bias), nodes=(node,),
        output_layout="merge_heads",
    )


def _mask_index_bias(graph: ir.Graph, mask_index: ir.Value, keys: ir.Value, filter_value: float,
                     node: ir.Node) -> ir.Value:
    """The additive bias `[B, 1, 1|Nq, Nk]` that contrib Attention derives from its `mask_index`.

    ORT's transformer optimizer feeds it either the raw 0/1 mask (`[B, Nk]` or `[B, Nq, Nk]`) or,
    through EmbedLayerNormalization, one end position per sequence (`[B]`: keys at or after it are
    padding). Masked keys get `mask_filter_value` (default -10000), as the op does.
    """
    rank = value_rank(mask_index)
    producer = mask_index.producer()
    if rank is None and producer is not None and producer.op_type == "EmbedLayerNormalization":
        # its second output is one end position per sequence; contrib ops get no inferred shapes
        rank = 1
        mask_index.type = ir.TensorType(ir.DataType.INT32)
        mask_index.shape = ir.Shape([keys.shape[0] if keys.shape is not None else None])
    batch, tokens = (keys.shape[0], keys.shape[1]) if keys.shape is not None else (None, None)
    zero = add_constant(graph, np.zeros((), np.float32), "zero")
    fill = add_constant(graph, np.array(filter_value, np.float32), "mask_filter")
    if rank == 1:
        length = typed(add_node(graph, "Shape", [keys], {"start": 1, "end": 2}, name="kv_len"), ir.DataType.INT64, [1])
        scalar = typed(add_node(graph, "Squeeze", [length, axes_input(graph, [0])], name="kv_len"), ir.DataType.INT64, [])
        start, step = (add_constant(graph, np.array(i, np.int64), "range") for i in (0, 1))
        positions = typed(add_node(graph, "Range", [start, scalar, step], name="key_positions"), ir.DataType.INT64,
                           [tokens])
        ends = typed(add_node(graph, "Cast", [mask_index], {"to": ir.DataType.INT64}, name="mask_ends"),
                      ir.DataType.INT64, [batch])
        ends = typed(add_node(graph, "Unsqueeze", [ends, axes_input(graph, [1])], name="mask_ends"), ir.DataType.INT64,
                      [batch, 1])
        keep = typed(add_node(graph, "Less", [positions, ends], name="mask_keep"), ir.DataType.BOOL, [batch, tokens])
        axes, rows = [1, 2], 1
    elif rank in (2, 3):
        keep = typed(add_node(graph, "Cast", [mask_index], {"to": ir.DataType.BOOL}, name="mask_keep"),
                      ir.DataType.BOOL, list(mask_index.shape) if mask_index.shape is not None else None)
        axes, rows = ([1, 2], 1) if rank == 2 else ([1], mask_index.shape[1] if mask_index.shape is not None else None)
    else:
        raise Reject(f"contrib Attention mask_index of rank {rank} is not rewritten", node)
    bias = typed(add_node(graph, "Where", [keep, zero, fill], name="mask_bias"), ir.DataType.FLOAT, None)
    return typed(add_node(graph, "Unsqueeze", [bias, axes_input(graph, axes)], name="mask_bias"), ir.DataType.FLOAT,
                  [batch, 1, rows, tokens])


def _split_bias(graph: ir.Graph, bias: ir.Value, parts: int) -> list[ir.Value]:
    arr = const_array(bias)
    if arr is None:
        raise Reject("MultiHeadAttention projection bias is not constant")
    return [add_constant(graph, chunk, "proj_bias") for chunk in np.split(arr, parts)]
