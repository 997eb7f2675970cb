"""Find softmax attention by meaning and describe each call as an `AttentionSite`.

Anchors are Softmax nodes and fused attention ops (ONNX `Attention`, `com.microsoft` Attention and
MultiHeadAttention). From a Softmax we walk *down* to the MatMul that applies the weights to values
and *up* through the logits chain (scale Mul/Div, bias Add, mask Where, Cast, shape-preserving
Reshape) to a MatMul or Einsum with two dynamic operands: Q·Kᵀ. Anything else is rejected with the
reason and the node that made us stop (a classifier softmax has no value MatMul; a mixture-of-experts
gate has logits x·W with a constant W).

The logits chain is affine in Q·Kᵀ: `f(x) = a·x + f(0)`. So `scale` is the product of the constant
factors, and the bias is the chain replayed on zeros, whatever mix of rel-pos tables, shifted-window
masks and padding masks the exporter added. Every candidate is then checked numerically (verify.py).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from attnrewrite import context, verify
from attnrewrite.canonicalize import const_array
from attnrewrite.graphutil import (
    add_constant,
    add_node,
    compose_perm,
    dims,
    is_constant,
    producer_op,
    scalar_constant,
)
from attnrewrite.site import AttentionSite, Rejection

#: Ops allowed between Softmax and the value MatMul (they keep the weights' meaning).
_PROBS_PASSTHROUGH = {"Cast", "Identity", "Dropout", "QuantizeLinear", "DequantizeLinear"}
#: Fake quantisation (QDQ models): value-preserving up to rounding, so detection looks through it.
_FAKE_QUANT = ("QuantizeLinear", "DequantizeLinear")
#: Longest logits chain we follow before giving up (real exports use ≤ 8).
_MAX_CHAIN = 16


class Reject(Exception):
    """Raised inside candidate analysis; carries the reason and the culprit node."""

    def __init__(self, reason: str, node: ir.Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


@dataclasses.dataclass
class Detection:
    model: ir.Model
    sites: list[AttentionSite]
    rejected: list[Rejection]


def detect(model: ir.Model, *, verify_sites: bool = True) -> Detection:
    """Find every attention site in a canonicalised model (adds helper nodes; run DCE before saving)."""
    graph = model.graph
    sites: list[AttentionSite] = []
    rejected: list[Rejection] = []
    const_memo: dict = {}
    token_memo: dict = {}
    for node in list(graph):
        try:
            if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
                site = _from_softmax(graph, node, const_memo)
            elif node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
                site = _from_onnx_attention(graph, node)
            elif node.domain == "com.microsoft" and node.op_type in ("MultiHeadAttention", "Attention"):
                site = _from_ms_attention(graph, node)
            else:
                continue
        except Reject as rej:
            culprit = rej.node if rej.node is not None else node
            where = node.name or node.op_type
            if culprit is not node:
                where = f"{where} (at {culprit.name or culprit.op_type})"
            rejected.append(Rejection(node=where, reason=rej.reason))
            continue
        site.id = f"attn_{len(sites)}"
        context.describe(site, model, const_memo, token_memo)
        sites.append(site)
    ir.passes.common.TopologicalSortPass()(model)
    if verify_sites and sites:
        failures = verify.verify_sites(model, sites)
        kept = []
        for site in sites:
            if site.id in failures:
                rejected.append(Rejection(node=site.anchor.name or site.op, reason=failures[site.id]))
            else:
                site.verified = True
                kept.append(site)
        for i, site in enumerate(kept):
            site.id = f"attn_{i}"
        sites = kept
    return Detection(model=model, sites=sites, rejected=rejected)


# ---------------------------------------------------------------------------------------------
# Softmax-anchored attention


def _from_softmax(graph: ir.Graph, softmax: ir.Node, const_memo: dict) -> AttentionSite:
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
    q_rank = _rank(q_base)
    if q_rank not in (3, 4):
        raise Reject(f"query has rank {q_rank}; need [B, h, N, d] or [B·h, N, d]", qk)
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
    if q_rank == 3:
        if _rank(v) != 3 or _rank(k_full) != 3:
            raise Reject("query is 3-D but keys or values are not", qk)
        q4, k4, v4 = (_heads_view(graph, t) for t in (q_base, k_full, v))
        layout = "squeeze1"
    elif _rank(v) != 4 or _rank(k_full) != 4:
        raise Reject("query is 4-D but keys or values are not", qk)
    bias, bias_kind = _bias_from_chain(graph, chain, qk, q4, k4, q_rank, const_memo)
    qd, kd = dims(q4) or [None] * 4, dims(k4) or [None] * 4
    head_dim = qd[3]
    if scale <= 0 or not math.isfinite(scale):
        raise Reject(f"logit scale {scale} is not a positive number", qk)
    site = AttentionSite(
        id="", op="Softmax", anchor=softmax, q=q4, k=k4, v=v4, output=pv.outputs[0],
        num_heads=qd[1] if layout == "bhnd" else context.heads_from_reshape(q_base, head_dim),
        head_dim=head_dim, q_len=qd[2], kv_len=kd[2], scale=scale, bias=bias, bias_kind=bias_kind,
        kind="self", instances=1, window=None, grid=None, prefix_tokens=None, rotary=False,
        nodes=covered, output_layout=layout, bias_per_key=bias is None or query_invariant(bias),
    )
    if row_factors:
        site.notes.append("per-head logit scale (e.g. Swin V2's cosine-attention temperature) folded into Q")
    if any(n.op_type in _FAKE_QUANT for n in covered):
        site.notes.append("logits or weights are fake-quantised (QDQ); a rewrite computes them in float")
    return site


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _axes(graph: ir.Graph, axes: list[int]) -> ir.Value:
    return add_constant(graph, np.array(axes, dtype=np.int64), "axes")


def _heads_view(graph: ir.Graph, x: ir.Value) -> ir.Value:
    """[B·h, N, d] viewed as [B·h, 1, N, d], so every site has the 4-D layout."""
    out = add_node(graph, "Unsqueeze", [x, _axes(graph, [1])], name="heads_view")
    if x.shape is not None:
        out.shape = ir.Shape([x.shape[0], 1, x.shape[1], x.shape[2]])
    out.type = x.type
    return out


def _find_value_matmul(softmax: ir.Node) -> tuple[ir.Node, list[ir.Node]]:
    value = softmax.outputs[0]
    passed: list[ir.Node] = []
    for _ in range(6):
        users = value.consumers()
        mm = [u for u in users if u.op_type in ("MatMul", "Einsum") and len(u.inputs) == 2 and u.inputs[0] is value]
        if mm:
            return mm[0], passed
        nxt = [u for u in users if u.op_type in _PROBS_PASSTHROUGH or _is_nan_guard(u, value)]
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
    arr = context.evaluate_constant(value)
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
        arr = context.evaluate_constant(operand)
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
    rank = _rank(q)
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
    raise Reject(f"neither operand of {node.op_type} leads to Q·Kᵀ", node)


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
    operands = {
        "Cast": (0,), "Identity": (0,), "Reshape": (0,), "Div": (0,), "Sub": (0,),
        "QuantizeLinear": (0,), "DequantizeLinear": (0,),
        "Mul": (0, 1), "Add": (0, 1), "Where": (1, 2),
    }.get(op, ())
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
    rank = _rank(value)
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
        attrs = {name: attr for name, attr in node.attributes.items()}
        out = add_node(graph, node.op_type, new_inputs, attrs, domain=node.domain, name="bias_replay")
        out.type = node.outputs[0].type
        out.shape = _replay_shape(node, new_inputs)
        mapping[node.outputs[0]] = out
        bias = out
    if q_rank == 3 and bias.shape is not None and len(bias.shape) == 3:
        bias = add_node(graph, "Unsqueeze", [bias, _axes(graph, [1])], name="bias_heads")
    if is_constant(bias, const_memo):
        arr = context.evaluate_constant(bias)
        if arr is not None:
            if arr.ndim == 0 or not np.any(arr) or np.all(arr == arr[..., :1]):
                return None, "none"  # softmax ignores a shift shared by every key of a row
            if q_rank == 3 and arr.ndim == 3:
                arr = arr[:, None]
            return add_constant(graph, arr.astype(np_dtype), "bias_const"), "constant"
        return bias, "constant"
    return bias, "input"


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


_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Not", "Equal", "Neg", "Less", "Greater",
                "LessOrEqual", "GreaterOrEqual", "And", "Or", "Identity", "Min", "Max"}


def query_invariant(value: ir.Value, depth: int = 0) -> bool:
    """Is the bias the same for every query row? True when every source has a query axis of 1.

    Exporters often Expand a `[B, 1, 1, Nk]` padding mask to `[B, 1, Nq, Nk]`; looking through
    Expand and elementwise ops recovers that it only ever depended on the key.
    """
    shape = value.shape
    if shape is not None and (len(shape) < 2 or shape[-2] == 1):
        return True
    node = value.producer()
    if node is None or depth > 24:
        return False
    if node.op_type == "Expand":
        return query_invariant(node.inputs[0], depth + 1)
    if node.op_type in _ELEMENTWISE:
        return all(i is None or query_invariant(i, depth + 1) for i in node.inputs)
    return False


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


# ---------------------------------------------------------------------------------------------
# Fused attention ops


def _from_onnx_attention(graph: ir.Graph, node: ir.Node) -> AttentionSite:
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
    rank = _rank(q)
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
        q4, k4, v4 = (_split_heads(graph, t, heads) for t in (q, k, v))
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
            arr = context.evaluate_constant(bias)
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
    return AttentionSite(
        id="", op="Attention", anchor=node, q=q4, k=k4, v=v4, output=node.outputs[0], num_heads=heads,
        head_dim=head_dim, q_len=qd[2], kv_len=kd[2], scale=float(scale), bias=bias, bias_kind=kind,
        kind="self", instances=1, window=None, grid=None, prefix_tokens=None, rotary=False,
        nodes=[node], output_layout=layout, bias_per_key=bias is None or query_invariant(bias),
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


def _split_heads(graph: ir.Graph, x: ir.Value, heads: int) -> ir.Value:
    d = dims(x)
    if d is None or d[2] is None:
        raise Reject("hidden size unknown; cannot split heads")
    shape = add_constant(graph, np.array([0, 0, heads, d[2] // heads], np.int64), "heads_shape")
    r = add_node(graph, "Reshape", [x, shape], name="split_heads")
    out = add_node(graph, "Transpose", [r], {"perm": [0, 2, 1, 3]}, name="split_heads")
    out.shape = ir.Shape([x.shape[0], heads, x.shape[1], d[2] // heads])
    out.type = x.type
    return out


def _from_ms_attention(graph: ir.Graph, node: ir.Node) -> AttentionSite:
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
        if k is None or v is None or _rank(k) != 3:
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
    q4, k4, v4 = (_split_heads(graph, t, heads) for t in (q, k, v))
    head_dim = dims(q4)[3]
    scale = attrs["scale"].value if "scale" in attrs and attrs["scale"].value != 0 else 1.0 / math.sqrt(head_dim)
    bias = attn_bias
    if mask_index is not None:
        filter_value = attrs["mask_filter_value"].value if "mask_filter_value" in attrs else -10000.0
        mask_bias = _mask_index_bias(graph, mask_index, k, filter_value, node)
        bias = mask_bias if bias is None else add_node(graph, "Add", [bias, mask_bias], name="mask_plus_bias")
    kind = "none" if bias is None else ("constant" if is_constant(bias) else "input")
    qd, kd = dims(q4), dims(k4)
    return AttentionSite(
        id="", op=f"com.microsoft.{node.op_type}", anchor=node, q=q4, k=k4, v=v4, output=node.outputs[0],
        num_heads=heads, head_dim=head_dim, q_len=qd[2], kv_len=kd[2], scale=float(scale), bias=bias,
        bias_kind=kind, kind="self", instances=1, window=None, grid=None, prefix_tokens=None, rotary=False,
        nodes=[node], output_layout="merge_heads", bias_per_key=bias is None or query_invariant(bias),
    )


def _mask_index_bias(graph: ir.Graph, mask_index: ir.Value, keys: ir.Value, filter_value: float,
                     node: ir.Node) -> ir.Value:
    """The additive bias `[B, 1, 1|Nq, Nk]` that contrib Attention derives from its `mask_index`.

    ORT's transformer optimizer feeds it either the raw 0/1 mask (`[B, Nk]` or `[B, Nq, Nk]`) or,
    through EmbedLayerNormalization, one end position per sequence (`[B]`: keys at or after it are
    padding). Masked keys get `mask_filter_value` (default -10000), as the op does.
    """
    rank = _rank(mask_index)
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
        length = _typed(add_node(graph, "Shape", [keys], {"start": 1, "end": 2}, name="kv_len"), ir.DataType.INT64, [1])
        scalar = _typed(add_node(graph, "Squeeze", [length, _axes(graph, [0])], name="kv_len"), ir.DataType.INT64, [])
        start, step = (add_constant(graph, np.array(i, np.int64), "range") for i in (0, 1))
        positions = _typed(add_node(graph, "Range", [start, scalar, step], name="key_positions"), ir.DataType.INT64,
                           [tokens])
        ends = _typed(add_node(graph, "Cast", [mask_index], {"to": ir.DataType.INT64}, name="mask_ends"),
                      ir.DataType.INT64, [batch])
        ends = _typed(add_node(graph, "Unsqueeze", [ends, _axes(graph, [1])], name="mask_ends"), ir.DataType.INT64,
                      [batch, 1])
        keep = _typed(add_node(graph, "Less", [positions, ends], name="mask_keep"), ir.DataType.BOOL, [batch, tokens])
        axes, rows = [1, 2], 1
    elif rank in (2, 3):
        keep = _typed(add_node(graph, "Cast", [mask_index], {"to": ir.DataType.BOOL}, name="mask_keep"),
                      ir.DataType.BOOL, list(mask_index.shape) if mask_index.shape is not None else None)
        axes, rows = ([1, 2], 1) if rank == 2 else ([1], mask_index.shape[1] if mask_index.shape is not None else None)
    else:
        raise Reject(f"contrib Attention mask_index of rank {rank} is not rewritten", node)
    bias = _typed(add_node(graph, "Where", [keep, zero, fill], name="mask_bias"), ir.DataType.FLOAT, None)
    return _typed(add_node(graph, "Unsqueeze", [bias, _axes(graph, axes)], name="mask_bias"), ir.DataType.FLOAT,
                  [batch, 1, rows, tokens])


def _typed(value: ir.Value, dtype: ir.DataType, shape: list | None) -> ir.Value:
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(shape) if shape is not None else None
    return value


def _split_bias(graph: ir.Graph, bias: ir.Value, parts: int) -> list[ir.Value]:
    arr = const_array(bias)
    if arr is None:
        raise Reject("MultiHeadAttention projection bias is not constant")
    return [add_constant(graph, chunk, "proj_bias") for chunk in np.split(arr, parts)]


__all__ = ["Detection", "detect", "producer_op"]
