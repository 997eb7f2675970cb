"""Softmax-anchored attention: walk down to the value MatMul and up the logits chain to Q·Kᵀ.

From a Softmax we walk *down* to the MatMul that applies the weights to values and *up* through the
logits chain (scale Mul/Div, bias Add, mask Where, Cast, shape-preserving Reshape) to a MatMul or
Einsum with two dynamic operands: Q·Kᵀ. Anything else is rejected with the reason and the node that
made us stop (a classifier softmax has no value MatMul; a mixture-of-experts gate has logits x·W with
a constant W).

The logits chain is affine in Q·Kᵀ: `f(x) = a·x + f(0)`. So `scale` is the product of the constant
factors, and the bias is the chain replayed on zeros, whatever mix of rel-pos tables, shifted-window
masks and padding masks the exporter added.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from attnrewrite.ir.evaluate import evaluate_constant
from attnrewrite.ir.graph import (
    add_constant,
    add_node,
    compose_perm,
    dims,
    is_constant,
    producer_op,
    scalar_constant,
)
from attnrewrite.onnx.context import heads_from_reshape
from attnrewrite.onnx.detect.reading import Reading, Reject, axes_input, query_invariant, value_rank


#: Ops allowed between Softmax and the value MatMul (they keep the weights' meaning).
_PROBS_PASSTHROUGH = {"Cast", "Identity", "Dropout", "QuantizeLinear", "DequantizeLinear"}


#: Fake quantisation (QDQ models): value-preserving up to rounding, so detection looks through it.
_FAKE_QUANT = ("QuantizeLinear", "DequantizeLinear")


#: Longest logits chain we follow before giving up (real exports use ≤ 8).
_MAX_CHAIN = 16


def read_softmax(graph: ir.Graph, softmax: ir.Node, const_memo: dict) -> Reading:
    """The attention a Softmax anchors, or `Reject` (a classifier head, a gate, a non-key axis)."""
    logits = softmax.inputs[0]
    rank = len(logits.shape) if logits.shape is not None else None
    default_axis = 1 if graph.opset_imports.get("", 13) < 13 else -1  # before opset 13: flatten from axis 1
    axis = softmax.attributes["axis"].value if "axis" in softmax.attributes else default_axis
    if rank is not None and axis not in (-1, rank - 1):
        raise Reject(f"softmax over axis {axis}, not the last (key) axis")
    chain, qk, scale, row_factors = _logits_chain(logits, const_memo)
    pv, probs_nodes = _find_value_matmul(softmax)
    v = pv.inputs[1]
    if v is None or is_constant(v, const_memo):
        raise Reject("softmax weights multiply a constant, not a value tensor (a classifier or gating head)", pv)
    q_raw, k_raw = qk.inputs[0], qk.inputs[1]
    covered = [qk, *chain, softmax, *probs_nodes, pv]
    if qk.op_type == "Einsum":
        _check_einsum(qk, "qk")
        _check_einsum(pv, "pv")
        q_base, q_factor, q_nodes = _peel_scalars(q_raw)
        k_base, k_factor, k_nodes = _peel_scalars(k_raw)
        k4_perm = None
    else:
        if pv.op_type != "MatMul":
            raise Reject("value product is an Einsum but logits are a MatMul", pv)
        q_base, q_factor, q_nodes = _peel_scalars(q_raw)
        k_base, k_factor, perm, k_nodes = _peel_key(k_raw)
        k4_perm = perm
    scale *= q_factor * k_factor
    covered += q_nodes + k_nodes
    if is_constant(q_base, const_memo) and is_constant(k_base, const_memo):
        raise Reject("both logits operands are constant", qk)
    if is_constant(k_base, const_memo):
        raise Reject("logits are x·W with a constant W (a gate or classifier), not Q·Kᵀ", qk)
    q_rank = value_rank(q_base)
    if q_rank not in (3, 4, 5):
        raise Reject(f"query has rank {q_rank}; need [B, h, N, d], [B·h, N, d] or [B, h, units, N, d]", qk)
    if row_factors:
        if qk.op_type == "Einsum":
            raise Reject("per-head logit scale on an Einsum product", qk)
        q_base = _scale_query_rows(graph, q_base, row_factors)
    if k4_perm is None:
        k_full = k_base
    else:
        k_full = _transpose_keys(graph, k_base, k4_perm)
    q4, k4, v4 = q_base, k_full, v
    layout = "bhnd"
    folded_heads = None
    if q_rank == 3:
        if value_rank(k_full) != 3 or value_rank(v) not in (3, 4):
            raise Reject("query is 3-D but keys or values are not", qk)
        layout = "squeeze1"
        if value_rank(v) == 4:  # dynamo's BLOOM: bmm(probs.view(B·h, N, T), v) exported as a 4-D MatMul
            v, folded_heads = _fold_values(graph, v, qk), dims(v)[1]
            layout = "folded_qk"
        q4, k4, v4 = (_heads_view(graph, t) for t in (q_base, k_full, v))
    elif q_rank == 5:
        if value_rank(v) != 5 or value_rank(k_full) != 5:
            raise Reject("query is 5-D but keys or values are not", qk)
        if any(n.op_type in ("Add", "Sub", "Where") for n in chain):
            raise Reject("a bias on mask-unit (rank-5) attention is not read", qk)
        q4, k4, v4 = (_units_view(graph, t) for t in (q_base, k_full, v))
        layout = "units"
    elif value_rank(v) != 4 or value_rank(k_full) != 4:
        raise Reject("query is 4-D but keys or values are not", qk)
    bias, bias_kind = _bias_from_chain(graph, chain, qk, q4, k4, q_rank, const_memo)
    qd, kd = dims(q4) or [None] * 4, dims(k4) or [None] * 4
    head_dim = qd[3]
    if scale <= 0 or not math.isfinite(scale):
        raise Reject(f"logit scale {scale} is not a positive number", qk)
    notes = []
    if row_factors:
        notes.append("per-head logit scale (e.g. Swin V2's cosine-attention temperature) folded into Q")
    if any(n.op_type in _FAKE_QUANT for n in covered):
        notes.append("logits or weights are fake-quantised (QDQ); a rewrite computes them in float")
    return Reading(
        op="Softmax", anchor=softmax, q=q4, k=k4, v=v4, output=pv.outputs[0],
        num_heads=folded_heads or (heads_from_reshape(q_base, head_dim) if layout == "squeeze1" else qd[1]),
        head_dim=head_dim, q_len=qd[2], kv_len=kd[2], scale=scale, bias=bias, bias_kind=bias_kind,
        bias_per_key=bias is None or query_invariant(bias), nodes=tuple(covered), output_layout=layout,
        notes=tuple(notes),
    )


def _heads_view(graph: ir.Graph, x: ir.Value) -> ir.Value:
    """[B·h, N, d] viewed as [B·h, 1, N, d], so every site has the 4-D layout."""
    out = add_node(graph, "Unsqueeze", [x, axes_input(graph, [1])], name="heads_view")
    if x.shape is not None:
        out.shape = ir.Shape([x.shape[0], 1, x.shape[1], x.shape[2]])
    out.type = x.type
    return out


def _fold_values(graph: ir.Graph, v: ir.Value, qk: ir.Node) -> ir.Value:
    """[B, h, T, d] values for weights computed on folded heads: viewed as [B·h, T, d]."""
    d = dims(v)
    if d is None or None in d[1:]:
        raise Reject("values keep their heads while Q·Kᵀ folds them; that needs static heads, tokens and dim", qk)
    shape = add_constant(graph, np.array([-1, d[2], d[3]], np.int64), "values_fold_shape")
    out = add_node(graph, "Reshape", [v, shape], name="values_fold")
    out.shape = ir.Shape([d[0] * d[1] if isinstance(d[0], int) else None, d[2], d[3]])
    out.type = v.type
    return out


def _units_view(graph: ir.Graph, x: ir.Value) -> ir.Value:
    """[B, h, U, N, d] (Hiera's mask units) viewed as [B·U, h, N, d]: each unit is an instance."""
    d = dims(x)
    if d is None or None in d[1:]:
        raise Reject("mask-unit (rank-5) attention needs static heads, units, tokens and head dim", x.producer())
    perm = add_node(graph, "Transpose", [x], {"perm": [0, 2, 1, 3, 4]}, name="units_view")
    shape = add_constant(graph, np.array([-1, d[1], d[3], d[4]], np.int64), "units_shape")
    out = add_node(graph, "Reshape", [perm, shape], name="units_view")
    perm.shape = ir.Shape([x.shape[0], d[2], d[1], d[3], d[4]])
    out.shape = ir.Shape([d[0] * d[2] if d[0] is not None else None, d[1], d[3], d[4]])
    perm.type = out.type = x.type
    return out


def _find_value_matmul(softmax: ir.Node) -> tuple[ir.Node, list[ir.Node]]:
    value = softmax.outputs[0]
    passed: list[ir.Node] = []
    for _ in range(6):
        users = value.consumers()
        mm = [u for u in users if u.op_type in ("MatMul", "Einsum") and len(u.inputs) == 2 and u.inputs[0] is value]
        if mm:
            return mm[0], passed
        nxt = [u for u in users if u.op_type in _PROBS_PASSTHROUGH or _is_nan_guard(u, value)
               or _folds_heads(u, value)]
        if not nxt:
            break
        passed.append(nxt[0])
        if nxt[0].op_type == "Where":  # the IsNaN feeding the guard belongs to the site too
            passed.append(nxt[0].inputs[0].producer())
        value = nxt[0].outputs[0]
    users = softmax.outputs[0].consumers()
    if not users:
        raise Reject("softmax output is a model output (class probabilities), not applied to values")
    kinds = sorted({u.op_type for u in users})
    raise Reject(f"softmax output feeds {', '.join(kinds)}, not a MatMul with values")


def _folds_heads(node: ir.Node, probs: ir.Value) -> bool:
    """A Reshape of the weights that keeps their [queries, keys] axes and only merges the leading
    ones: DeBERTa's `probs.view(-1, N, T)` before a `bmm` with [B·h, T, d] values."""
    if node.op_type != "Reshape" or node.inputs[0] is not probs:
        return False
    before, after = dims(probs), dims(node.outputs[0])
    if before is None or after is None or len(before) != 4 or len(after) != 3:
        return False
    # with a dynamic sequence the axes are unknown: the numerical check of the site decides
    return all(b == a or not isinstance(b, int) or not isinstance(a, int) for b, a in zip(before[-2:], after[-2:]))


def _is_nan_guard(node: ir.Node, probs: ir.Value) -> bool:
    """`Where(IsNaN(p), 0, p)`: the dynamo SDPA decomposition's guard for fully masked rows."""
    if node.op_type != "Where" or len(node.inputs) != 3 or node.inputs[2] is not probs:
        return False
    cond = node.inputs[0].producer() if node.inputs[0] is not None else None
    fill = scalar_constant(node.inputs[1])
    return cond is not None and cond.op_type == "IsNaN" and cond.inputs[0] is probs and fill == 0.0


def _logits_chain(logits: ir.Value, const_memo: dict) -> tuple[list[ir.Node], ir.Node, float, list[np.ndarray]]:
    """Walk up from the softmax input to Q·Kᵀ; returns (chain in execution order, qk node, scale,
    row factors).

    The chain is affine in Q·Kᵀ, so the scale is the product of its Mul/Div constants. A constant
    that varies per head or per query but not per key (Swin V2's learned temperature, `[h, 1, 1]`)
    scales rows of Q·Kᵀ, so it is returned as a row factor to fold into Q.
    """
    chain: list[ir.Node] = []
    scale = 1.0
    row_factors: list[np.ndarray] = []
    value = logits
    for _ in range(_MAX_CHAIN):
        node = value.producer()
        if node is None:
            raise Reject("softmax input is a graph input, not Q·Kᵀ")
        op = node.op_type
        if op in ("MatMul", "Einsum") and len(node.inputs) == 2:
            # A constant right operand is a weight (gate, classifier); a constant left operand with
            # dynamic keys is a learned query (attention pooling, Perceiver latents): attention.
            if is_constant(node.inputs[1], const_memo):
                if is_constant(node.inputs[0], const_memo):
                    raise Reject("Q and K are both constant (learned queries attending to each other, as in "
                                 "DETR's first decoder layer): the whole attention is a constant", node)
                raise Reject("logits are x·W with a constant W (a gate or classifier), not Q·Kᵀ", node)
            chain.reverse()
            return chain, node, scale, row_factors
        if op in ("Cast", "Identity", "Reshape", *_FAKE_QUANT):
            if op == "Reshape" and row_factors:
                raise Reject("per-head logit scale is applied after the logits were reshaped", node)
            nxt = node.inputs[0]
        elif op in ("Mul", "Div"):
            factor = _scalar(node.inputs[1], const_memo)
            nxt = node.inputs[0]
            if factor is None and op == "Mul":
                factor = _scalar(node.inputs[0], const_memo)
                nxt = node.inputs[1]
            if factor is None:
                rows, nxt = _row_factor(node, const_memo)
                if rows is None:
                    raise Reject(f"logits {op} by a non-scalar or dynamic tensor", node)
                row_factors.append(rows)
            else:
                scale *= factor if op == "Mul" else 1.0 / factor
        elif op in ("Add", "Sub"):
            nxt = _logits_operand(node, (0, 1) if op == "Add" else (0,), const_memo)
        elif op == "Where":
            nxt = _logits_operand(node, (1, 2), const_memo)
        else:
            raise Reject(f"logits come from {op}, not from Q·Kᵀ", node)
        chain.append(node)
        value = nxt
    raise Reject("logits chain longer than the detector follows")


def _scalar(value: ir.Value | None, const_memo: dict) -> float | None:
    """A one-element constant's number, also when it is computed (QDQ models quantise the scale:
    `DequantizeLinear(int8 constant)`, which the folder leaves in place)."""
    number = scalar_constant(value)
    if number is not None or value is None or value.producer() is None or not is_constant(value, const_memo):
        return number
    arr = evaluate_constant(value)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def _row_factor(node: ir.Node, const_memo: dict) -> tuple[np.ndarray | None, ir.Value]:
    """A finite, non-zero constant operand of a logits Mul/Div whose key axis is 1; the other operand.

    Such a factor multiplies whole rows of Q·Kᵀ, which is the same as multiplying the rows of Q.
    """
    slots = ((1, 0), (0, 1)) if node.op_type == "Mul" else ((1, 0),)
    for const_pos, data_pos in slots:
        operand = node.inputs[const_pos]
        if operand is None or not is_constant(operand, const_memo):
            continue
        arr = evaluate_constant(operand)
        if arr is None or arr.ndim == 0 or arr.shape[-1] != 1 or not np.issubdtype(arr.dtype, np.floating):
            continue
        if not np.all(np.isfinite(arr)) or not np.all(arr != 0):
            continue
        return (arr if node.op_type == "Mul" else 1.0 / arr), node.inputs[data_pos]
    return None, node.inputs[0]


def _scale_query_rows(graph: ir.Graph, q: ir.Value, factors: list[np.ndarray]) -> ir.Value:
    """Q multiplied by the product of the row factors (each broadcasts like the logits minus keys)."""
    combined = factors[0]
    for f in factors[1:]:
        combined = combined * f
    rank = value_rank(q)
    if combined.ndim > rank:
        raise Reject(f"per-head logit scale of rank {combined.ndim} does not fit a rank-{rank} query")
    np_dtype = (q.dtype or ir.DataType.FLOAT).numpy()
    const = add_constant(graph, combined.astype(np_dtype), "row_scale")
    out = add_node(graph, "Mul", [q, const], name="q_row_scaled")
    out.type = q.type
    out.shape = q.shape
    return out


def _logits_operand(node: ir.Node, positions: tuple[int, ...], const_memo: dict) -> ir.Value:
    """Pick the operand that leads to a dynamic MatMul (the other operands are bias or mask)."""
    for pos in positions:
        cand = node.inputs[pos]
        if cand is not None and _reaches_qk(cand, const_memo):
            return cand
    for pos in positions:
        blocker = _non_affine_above(node.inputs[pos], const_memo)
        if blocker is not None:
            raise Reject(f"logits pass through {blocker.op_type} (e.g. Gemma 2's tanh soft-capping), which is not "
                         "affine in Q·Kᵀ, so the weights are not softmax(scale·QKᵀ + bias)", blocker)
    raise Reject(f"neither operand of {node.op_type} leads to Q·Kᵀ", node)


#: Ops a logits chain may pass (each affine in Q·Kᵀ), with the operands that carry the logits.
_CHAIN_OPERANDS = {
    "Cast": (0,), "Identity": (0,), "Reshape": (0,), "Div": (0,), "Sub": (0,),
    "QuantizeLinear": (0,), "DequantizeLinear": (0,),
    "Mul": (0, 1), "Add": (0, 1), "Where": (1, 2),
}


def _non_affine_above(value: ir.Value | None, const_memo: dict, depth: int = 0) -> ir.Node | None:
    """The first op outside the affine chain ops on a path from `value` up to Q·Kᵀ, if there is one:
    what to name when a site is rejected for it."""
    if value is None or depth > _MAX_CHAIN or is_constant(value, const_memo) or value.producer() is None:
        return None
    node = value.producer()
    operands = _CHAIN_OPERANDS.get(node.op_type)
    if operands is None:
        if node.op_type in ("MatMul", "Einsum"):
            return None
        return node if any(i is not None and _reaches_qk(i, const_memo) for i in node.inputs) else None
    for i in operands:
        found = _non_affine_above(node.inputs[i] if i < len(node.inputs) else None, const_memo, depth + 1)
        if found is not None:
            return found
    return None


def _reaches_qk(value: ir.Value, const_memo: dict, depth: int = 0) -> bool:
    """Does some path of logits-chain ops lead from `value` up to a MatMul of two dynamic operands?"""
    if depth > _MAX_CHAIN or is_constant(value, const_memo):
        return False
    node = value.producer()
    if node is None:
        return False
    op = node.op_type
    if op in ("MatMul", "Einsum"):
        return len(node.inputs) == 2 and not is_constant(node.inputs[1], const_memo)
    operands = _CHAIN_OPERANDS.get(op, ())
    return any(
        node.inputs[i] is not None and _reaches_qk(node.inputs[i], const_memo, depth + 1) for i in operands
    )


def _peel_scalars(value: ir.Value) -> tuple[ir.Value, float, list[ir.Node]]:
    """Strip Mul/Div by scalar constants (e.g. `q * scale`, √scale on q); returns (base, factor, nodes)."""
    factor, nodes = 1.0, []
    while True:
        node = value.producer()
        if node is None or node.op_type not in ("Mul", "Div"):
            return value, factor, nodes
        c = scalar_constant(node.inputs[1])
        base = node.inputs[0]
        if c is None and node.op_type == "Mul":
            c, base = scalar_constant(node.inputs[0]), node.inputs[1]
        if c is None or c == 0:
            return value, factor, nodes
        factor *= c if node.op_type == "Mul" else 1.0 / c
        nodes.append(node)
        value = base


def _peel_key(value: ir.Value) -> tuple[ir.Value, float, list[int], list[ir.Node]]:
    """Strip scalars and Transposes from the Kᵀ operand: Kᵀ = transpose(base, perm) · factor."""
    factor, nodes = 1.0, []
    rank = value_rank(value)
    if rank is None:
        raise Reject("rank of the key operand is unknown", value.producer())
    perm = list(range(rank))
    while True:
        base, f, scal = _peel_scalars(value)
        factor *= f
        nodes += scal
        node = base.producer()
        if node is not None and node.op_type == "DequantizeLinear" and producer_op(node.inputs[0]) == "QuantizeLinear":
            quant = node.inputs[0].producer()  # QDQ models quantise Kᵀ: the key is what went in
            nodes += [node, quant]
            value = quant.inputs[0]
            continue
        if node is None or node.op_type != "Transpose":
            return base, factor, perm, nodes
        inner = list(node.attributes["perm"].value) if "perm" in node.attributes else list(reversed(range(rank)))
        perm = compose_perm(perm, inner)
        nodes.append(node)
        value = node.inputs[0]


def _transpose_keys(graph: ir.Graph, base: ir.Value, kt_perm: list[int]) -> ir.Value:
    """K in [.., T, d] from `base` where Kᵀ = transpose(base, kt_perm)."""
    k_perm = kt_perm[:-2] + [kt_perm[-1], kt_perm[-2]]
    if k_perm == list(range(len(k_perm))):
        return base
    out = add_node(graph, "Transpose", [base], {"perm": k_perm}, name="keys")
    bd = dims(base)
    if bd is not None:
        out.shape = ir.Shape([base.shape[p] for p in k_perm])
        out.type = base.type
    return out


def _check_einsum(node: ir.Node, role: str) -> None:
    eq = node.attributes["equation"].value.replace(" ", "")
    lhs, _, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2 or not out:
        raise Reject(f"einsum {eq!r} is not a batched matrix product", node)
    a, b = terms
    ok = (
        len(a) == len(b) == len(out) and a[:-2] == b[:-2] == out[:-2]
        and (
            (role == "qk" and a[-1] == b[-1] and out[-2:] == a[-2] + b[-2])
            or (role == "pv" and a[-1] == b[-2] and out[-2:] == a[-2] + b[-1])
        )
    )
    if not ok:
        raise Reject(f"einsum {eq!r} is not the {'Q·Kᵀ' if role == 'qk' else 'P·V'} form we rewrite", node)


def _bias_from_chain(graph, chain, qk, q4, k4, q_rank, const_memo):
    """Replay the logits chain on zeros: f(0) is the total additive bias in the logits layout."""
    adds = [n for n in chain if n.op_type in ("Add", "Sub", "Where")]
    if not adds:
        return None, "none"
    needs_full = any(n.op_type == "Reshape" for n in chain)
    qk_out = qk.outputs[0]
    dtype = qk_out.dtype or ir.DataType.FLOAT
    np_dtype = dtype.numpy()
    if needs_full:
        zeros = _zeros_like_logits(graph, q4, k4, q_rank, np_dtype)
    else:
        zeros = add_constant(graph, np.zeros((), dtype=np_dtype), "zero_logits")
    mapping = {qk_out: zeros}
    bias = zeros
    for node in chain:
        new_inputs = [mapping.get(i, i) for i in node.inputs]
        if node.op_type == "Reshape":
            new_inputs[1] = _static_target(graph, node) or new_inputs[1]
        attrs = {name: attr for name, attr in node.attributes.items()}
        out = add_node(graph, node.op_type, new_inputs, attrs, domain=node.domain, name="bias_replay")
        out.type = node.outputs[0].type
        out.shape = _replay_shape(node, new_inputs)
        mapping[node.outputs[0]] = out
        bias = out
    if q_rank == 3 and bias.shape is not None and len(bias.shape) == 3:
        unsqueezed = add_node(graph, "Unsqueeze", [bias, axes_input(graph, [1])], name="bias_heads")
        unsqueezed.shape, unsqueezed.type = ir.Shape([bias.shape[0], 1, *bias.shape[1:]]), bias.type
        bias = unsqueezed
    elif q_rank == 3 and bias.shape is not None and len(bias.shape) == 4 and bias.shape[1] != 1:
        bias = _fold_bias_heads(graph, bias)
    if is_constant(bias, const_memo):
        arr = evaluate_constant(bias)
        if arr is not None:
            if arr.ndim == 0 or not np.any(arr) or np.all(arr == arr[..., :1]):
                return None, "none"  # softmax ignores a shift shared by every key of a row
            if q_rank == 3 and arr.ndim == 3:
                arr = arr[:, None]
            return add_constant(graph, arr.astype(np_dtype), "bias_const"), "constant"
        return bias, "constant"
    return bias, "input"


def _static_target(graph: ir.Graph, reshape: ir.Node) -> ir.Value | None:
    """The Reshape's target as a constant `[-1, d1, d2, ...]` when every axis but the first is static.
    Exporters compute `view(-1, h, N, T)` targets from Shape ops of the batch-dynamic scores; replayed
    on the bias, such a target ties the bias to tensors outside the site."""
    out = dims(reshape.outputs[0])
    if out is None or len(out) < 2 or not all(isinstance(d, int) for d in out[1:]):
        return None
    return add_constant(graph, np.array([-1, *out[1:]], np.int64), "bias_reshape_target")


def _fold_bias_heads(graph: ir.Graph, bias: ir.Value) -> ir.Value:
    """A [B, h, N, T] bias for scores computed as [B·h, N, T] (the chain split the heads out before a
    mask, as DeBERTa does): back to the site's [B·h, 1, N, T]."""
    b, h, n, t = bias.shape
    shape = add_constant(graph, np.array([-1, 1, 0, 0], np.int64), "bias_fold_shape")  # 0: keep that axis
    out = add_node(graph, "Reshape", [bias, shape], name="bias_fold_heads")
    out.shape = ir.Shape([b * h if isinstance(b, int) and isinstance(h, int) else None, 1, n, t])
    out.type = bias.type
    return out


def _replay_shape(node: ir.Node, inputs: list[ir.Value | None]) -> ir.Shape | None:
    """Shape of a replayed chain node: broadcast for elementwise ops, the original's for Reshape."""
    if node.op_type == "Reshape":
        return node.outputs[0].shape
    if node.op_type in ("Cast", "Identity"):
        return inputs[0].shape
    operands = [i for i in (inputs[1:] if node.op_type == "Where" else inputs) if i is not None]
    if node.op_type == "Where":
        operands = [i for i in inputs if i is not None]
    shapes = [i.shape for i in operands]
    if any(sh is None for sh in shapes):
        return None
    rank = max(len(sh) for sh in shapes)
    result = []
    for axis in range(rank):
        dims_here = [sh[axis - rank + len(sh)] for sh in shapes if axis - rank + len(sh) >= 0]
        ints = {d for d in dims_here if isinstance(d, int) and d != 1}
        if len(ints) == 1:
            result.append(ints.pop())
        elif all(d == 1 for d in dims_here):
            result.append(1)
        else:
            result.append(next((d for d in dims_here if not isinstance(d, int)), None))
    return ir.Shape(result)


def _zeros_like_logits(graph, q4, k4, q_rank, np_dtype) -> ir.Value:
    qd, kd = dims(q4), dims(k4)
    if qd and kd and None not in qd[:3] and kd[2] is not None:
        shape = qd[:3] + [kd[2]]
        if q_rank == 3:
            shape = [shape[0], shape[2], shape[3]]
        return add_constant(graph, np.zeros(shape, dtype=np_dtype), "zero_logits")
    q_shape = add_node(graph, "Shape", [q4], {"end": 3}, name="logits_shape")
    k_len = add_node(graph, "Shape", [k4], {"start": 2, "end": 3}, name="logits_shape")
    full = add_node(graph, "Concat", [q_shape, k_len], {"axis": 0}, name="logits_shape")
    if q_rank == 3:
        full = add_node(graph, "Gather", [full, add_constant(graph, np.array([0, 2, 3], np.int64), "idx")], {"axis": 0}, name="logits_shape")
    fill = ir.tensor(np.zeros(1, dtype=np_dtype))
    return add_node(graph, "ConstantOfShape", [full], {"value": fill}, name="zero_logits")
