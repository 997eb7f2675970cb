"""Integer quantisation of attention operands: the math once in numpy, and its ONNX emission.

SageAttention's recipe (ALGORITHMS.md §7): symmetric integers, round half to even, saturating, with a
scale per group (`tensor`, `head`, `token`, or `block:B` tokens) that is either computed in the graph
from the tensor (dynamic) or fitted on calibration activations (static); K smoothed by subtracting its
token mean (exact: q·k̄ is constant along a softmax row); V optionally smoothed by its channel mean,
added back after P·V (exact: softmax rows sum to one); V scaled per channel; P quantised as
P̃ = P / rowmax(P) = exp(S − rowmax S) ∈ [0, 1] with the static scale 1/levels and the row's factor
applied after P·V. That is SageAttention's P̃ (quantised before normalisation, normalised by the float
row sum): quantising the normalised P with 1/levels instead rounds every weight of a diffuse row to
zero once the row has more than ~2·levels keys (a DiT at 4096 tokens lost 8 % output cosine that way).

Formats. On ORT CPU an 8-bit product runs as uint8 × int8 (int8 × int8 is ~8× slower), and on AVX2
CPUs without VNNI that kernel adds int16 pairs with saturation: full-range operands were off by up to
75 000 in the int32 result on this machine. So one operand of each product has 7 bits: Q lies in ±63
(uint8, zero point 64) against K in ±127, and P in [0, 127] against V in ±127; every pair sum stays
below 2¹⁵ and the integer product is exact on every x86 CPU (PARO's INT8 P·V kernel also uses 127).
The 4-bit format (±7, P in [0, 15]) has no activation × activation kernel in ORT CPU: it is computed
as integer-valued floats (exact products), an accuracy simulation until a GPU kernel runs it natively.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes.ops import const, reduce

#: the smallest scale: a group of zeros quantises to zeros instead of dividing by zero
TINY = np.float32(1e-30)


@dataclasses.dataclass(frozen=True)
class Format:
    """Integer ranges of one bit width; `native` says whether ORT CPU has an integer kernel for it."""

    bits: int
    q_levels: int  # |Q| ≤ q_levels
    k_levels: int
    p_levels: int  # 0 ≤ P ≤ p_levels, static scale 1/p_levels
    v_levels: int
    native: bool


FORMATS = {8: Format(8, 63, 127, 127, 127, native=True), 4: Format(4, 7, 7, 15, 7, native=False)}
#: zero point that shifts Q's ±63 into uint8 for ORT's fast uint8 × int8 kernel
Q_ZERO_POINT = 64


def granularity(text: str) -> str:
    """`tensor`, `head`, `token` or `block:B` (B tokens per group)."""
    if text in GROUP_AXES:
        return text
    kind, _, size = text.partition(":")
    if kind == "block" and size.isdigit() and int(size) > 0:
        return f"block:{int(size)}"
    raise ValueError("expected tensor, head, token or block:B")


def block_size(gran: str) -> int | None:
    return int(gran.split(":")[1]) if gran.startswith("block:") else None


#: axes of a `[B, h, N, d]` operand that one scale covers, per granularity (block:B is the fourth kind);
#: the numpy reference, the ONNX emission and the torch module all reduce over these
GROUP_AXES = {"tensor": (0, 1, 2, 3), "head": (0, 2, 3), "token": (3,)}


# --- the math, defined once (numpy); the ONNX emission below is tested against it -------------


def group_absmax(x: np.ndarray, gran: str) -> np.ndarray:
    """max |x| per group, broadcastable to `x` `[B, h, N, d]` (block groups are repeated per token)."""
    a = np.abs(x.astype(np.float32))
    if gran in GROUP_AXES:
        return a.max(axis=GROUP_AXES[gran], keepdims=True)
    size = block_size(gran)
    b, h, n, _ = a.shape
    nb = math.ceil(n / size)
    padded = np.zeros((b, h, nb * size, a.shape[3]), np.float32)
    padded[:, :, :n] = a
    per_block = padded.reshape(b, h, nb, size, -1).max(axis=(3, 4), keepdims=True)
    return np.broadcast_to(per_block, (b, h, nb, size, 1)).reshape(b, h, nb * size, 1)[:, :, :n]


def scale_of(absmax: np.ndarray, levels: int) -> np.ndarray:
    return np.maximum(absmax.astype(np.float32) / np.float32(levels), TINY)


def quantize(x: np.ndarray, scale: np.ndarray, levels: int, low: int | None = None) -> np.ndarray:
    """Integers (as float32) in [low, levels]: round half to even of x / scale, saturated."""
    low = -levels if low is None else low
    return np.clip(np.rint(x.astype(np.float32) / scale.astype(np.float32)), low, levels)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantise and how; `qk`/`pv` are a Format or None (float)."""

    qk: Format | None
    pv: Format | None
    smooth_k: bool
    smooth_v: bool
    granularity: str
    #: fitted scales {"q", "k", "v"} broadcastable to the tensors; None: computed from each input
    static: dict[str, np.ndarray] | None = None
    #: "row": each row of P at rowmax(P)/levels (SageAttention's P̃); "static": P at 1/levels
    p_scale: str = "row"


def smooth(k: np.ndarray) -> np.ndarray:
    return k - k.mean(axis=2, keepdims=True, dtype=np.float32)


def operand_scales(q: np.ndarray, k: np.ndarray, v: np.ndarray, cfg: QuantConfig) -> dict[str, np.ndarray]:
    """The scales of Q, K (smoothed if asked) and V per channel, dynamic or the fitted static ones."""
    if cfg.static is not None:
        return cfg.static
    scales = {}
    if cfg.qk is not None:
        scales["q"] = scale_of(group_absmax(q, cfg.granularity), cfg.qk.q_levels)
        scales["k"] = scale_of(group_absmax(k, cfg.granularity), cfg.qk.k_levels)
    if cfg.pv is not None:
        scales["v"] = scale_of(np.abs(v.astype(np.float32)).max(axis=2, keepdims=True), cfg.pv.v_levels)
    return scales


def quant_attention_reference(q, k, v, *, scale: float, cfg: QuantConfig, bias=None, keep=None) -> dict[str, np.ndarray]:
    """softmax(scale·Q̂K̂ᵀ + bias)·V̂ with the configured quantisation, in float32 like the graph.

    `keep` (bool, broadcastable to `[B, h, Nq, Nk]`) restricts each query to a key subset (block
    sparsity). Returns the output and the integer intermediates (`q_int`, `k_int`, `logits_int`,
    `v_int`, as float32 holding integers) that the graph must reproduce exactly.
    """
    q, k, v = (x.astype(np.float32) for x in (q, k, v))
    if cfg.smooth_k:
        k = smooth(k)
    v_mean = v.mean(axis=2, keepdims=True, dtype=np.float32) if cfg.smooth_v else None
    if v_mean is not None:
        v = v - v_mean
    scales = operand_scales(q, k, v, cfg)
    out: dict[str, np.ndarray] = {"scales": scales}
    if cfg.qk is None:
        logits = (q * np.float32(scale)) @ np.swapaxes(k, -1, -2)
    else:
        out["q_int"] = quantize(q, scales["q"], cfg.qk.q_levels)
        out["k_int"] = quantize(k, scales["k"], cfg.qk.k_levels)
        out["logits_int"] = out["q_int"].astype(np.float64) @ np.swapaxes(out["k_int"], -1, -2).astype(np.float64)
        row = scales["q"].astype(np.float64) * scale
        logits = (out["logits_int"] * row * np.swapaxes(scales["k"], -1, -2)).astype(np.float32)
    if bias is not None:
        logits = logits + bias.astype(np.float32)
    if keep is not None:
        logits = np.where(keep, logits, -np.inf)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    if cfg.pv is None:
        o = p @ v
    else:
        levels = cfg.pv.p_levels
        out["v_int"] = quantize(v, scales["v"], cfg.pv.v_levels)
        p_max = p.max(axis=-1, keepdims=True) if cfg.p_scale == "row" else np.ones_like(p[..., :1])
        p_int = np.clip(np.rint(p / (p_max / np.float32(levels))), 0, levels)
        o = ((p_int.astype(np.float64) @ out["v_int"]) * (scales["v"] / levels) * p_max).astype(np.float32)
    if v_mean is not None:
        o = o + v_mean
    out["output"] = o
    return out


# --- ONNX emission -------------------------------------------------------------------------------


def emit_absmax(t: ir_tape.Tape, graph: ir.Graph, x: ir.Value, gran: str, tokens: int | None) -> ir.Value:
    """max |x| per group of a `[B, h, N, d]` value, shaped to broadcast against it."""
    a = t.op("Abs", [x])
    if gran in GROUP_AXES:
        return reduce(t, graph, "ReduceMax", a, list(GROUP_AXES[gran]))
    size = block_size(gran)
    nb = math.ceil(tokens / size)
    if nb * size != tokens:
        a = t.op("Pad", [a, const(t, [0, 0, 0, 0, 0, 0, nb * size - tokens, 0])])
    blocks = reduce(t, graph, "ReduceMax", t.op("Reshape", [a, const(t, [0, 0, nb, size, -1])]), [3, 4])
    per_token = t.op("Reshape", [t.op("Expand", [blocks, const(t, [1, 1, 1, size, 1])]), const(t, [0, 0, nb * size, 1])])
    return t.op("Slice", [per_token, const(t, [0]), const(t, [tokens]), const(t, [2])]) if nb * size != tokens else per_token


def emit_scale(t: ir_tape.Tape, absmax: ir.Value, levels: int) -> ir.Value:
    return t.op("Max", [t.op("Div", [absmax, const(t, float(levels), np.float32)]), const(t, TINY, np.float32)])


def emit_quantize(t: ir_tape.Tape, x: ir.Value, scale: ir.Value, levels: int) -> ir.Value:
    """Clip(Round(x / scale)): the same float32 operations as `quantize`, so the integers are identical."""
    q = t.op("Round", [t.op("Div", [x, scale])])
    return t.op("Clip", [q, const(t, float(-levels), np.float32), const(t, float(levels), np.float32)])


def transpose_last(t: ir_tape.Tape, x: ir.Value, rank: int = 4) -> ir.Value:
    return t.op("Transpose", [x], attributes={"perm": [*range(rank - 2), rank - 1, rank - 2]})


@dataclasses.dataclass(frozen=True)
class Operands:
    """Q, K, V ready for the two products: integers (uint8/int8 for 8 bits, integer-valued floats for
    4) or floats, with their scales; `v_mean` is added back after P·V when V was smoothed."""

    q: ir.Value
    k: ir.Value
    v: ir.Value
    q_scale: ir.Value | None
    k_scale: ir.Value | None
    v_scale: ir.Value | None
    v_mean: ir.Value | None


def emit_operands(t: ir_tape.Tape, graph: ir.Graph, q: ir.Value, k: ir.Value, v: ir.Value, cfg: QuantConfig,
                  tokens: tuple[int | None, int | None]) -> Operands:
    """Smooth and quantise Q, K, V (all `[B, h, N, d]`); `tokens` are the Q and K lengths (block groups)."""
    if cfg.smooth_k:
        k = t.op("Sub", [k, reduce(t, graph, "ReduceMean", k, [2])])
    v_mean = None
    if cfg.smooth_v:
        v_mean = reduce(t, graph, "ReduceMean", v, [2])
        v = t.op("Sub", [v, v_mean])

    def scale(name: str, x: ir.Value, levels: int, gran: str, n: int | None) -> ir.Value:
        if cfg.static is not None:
            return const(t, cfg.static[name], np.float32)
        return emit_scale(t, emit_absmax(t, graph, x, gran, n), levels)

    q_scale = k_scale = v_scale = None
    if cfg.qk is not None:
        q_scale = scale("q", q, cfg.qk.q_levels, cfg.granularity, tokens[0])
        k_scale = scale("k", k, cfg.qk.k_levels, cfg.granularity, tokens[1])
        q = emit_quantize(t, q, q_scale, cfg.qk.q_levels)
        k = emit_quantize(t, k, k_scale, cfg.qk.k_levels)
        if cfg.qk.native:
            shifted = t.op("Add", [q, const(t, float(Q_ZERO_POINT), np.float32)])
            q = t.op("Cast", [shifted], attributes={"to": ir.DataType.UINT8})
            k = t.op("Cast", [k], attributes={"to": ir.DataType.INT8})
    if cfg.pv is not None:
        if cfg.static is not None:
            v_scale = const(t, cfg.static["v"], np.float32)
        else:  # per channel: the max over tokens
            v_scale = emit_scale(t, reduce(t, graph, "ReduceMax", t.op("Abs", [v]), [2]), cfg.pv.v_levels)
        v = emit_quantize(t, v, v_scale, cfg.pv.v_levels)
        if cfg.pv.native:
            v = t.op("Cast", [v], attributes={"to": ir.DataType.INT8})
    return Operands(q, k, v, q_scale, k_scale, v_scale, v_mean)


def emit_logits(t: ir_tape.Tape, q: ir.Value, k: ir.Value, q_scale: ir.Value | None,
                k_scale: ir.Value | None, scale: float, fmt: Format | None, rank: int = 4) -> ir.Value:
    """scale·Q·Kᵀ in float from operands that may be quantised; Q `[.., Nq, d]`, K `[.., Nk, d]`,
    scales `[.., Nq|1, 1]` and `[.., Nk|1, 1]` (from `emit_operands`, possibly gathered by the caller)."""
    if fmt is None:
        return t.op("MatMul", [t.op("Mul", [q, const(t, scale, np.float32)]), transpose_last(t, k, rank)])
    row = t.op("Mul", [q_scale, const(t, scale, np.float32)])
    col = transpose_last(t, k_scale, rank)
    if fmt.native:  # int32 products dequantised inside the kernel (per-row × per-column scales broadcast)
        return t.op("MatMulIntegerToFloat", [q, transpose_last(t, k, rank), row, col, const(t, Q_ZERO_POINT, np.uint8)],
                    domain="com.microsoft")
    return t.op("Mul", [t.op("Mul", [t.op("MatMul", [q, transpose_last(t, k, rank)]), row]), col])


def emit_pv(t: ir_tape.Tape, graph: ir.Graph, p: ir.Value, v: ir.Value, v_scale: ir.Value | None,
            fmt: Format | None, p_scale: str = "row") -> ir.Value:
    """P·V; when V is quantised, each row of P is quantised with the scale rowmax(P)/levels (that is,
    P̃ = P / rowmax(P) at 1/levels) and the row factor multiplies the (small) result.

    Natively that is one per-axis QuantizeLinear over P viewed as `[rows, keys]` (a free reshape): a
    broadcast Div or Sub over the N×N tensor costs more on ORT CPU than the INT8 product saves."""
    if fmt is None:
        return t.op("MatMul", [p, v])
    levels = fmt.p_levels
    v_scale = t.op("Div", [v_scale, const(t, float(levels), np.float32)])
    if p_scale == "static":  # P ∈ [0, 1] at 1/levels: cheaper, but diffuse rows of many keys round to 0
        return _pv_static(t, p, v, v_scale, fmt)
    p_max = reduce(t, graph, "ReduceMax", p, [-1])
    if fmt.native:
        keys = t.op("Slice", [t.op("Shape", [p]), const(t, [-1]), const(t, [np.iinfo(np.int64).max])])
        rows = t.op("Reshape", [p, t.op("Concat", [const(t, [-1]), keys], attributes={"axis": 0})])
        row_scale = t.op("Reshape", [t.op("Div", [p_max, const(t, float(levels), np.float32)]), const(t, [-1])])
        # no zero point: per-axis QuantizeLinear then outputs uint8 with zero point 0
        p_int = t.op("QuantizeLinear", [rows, row_scale], attributes={"axis": 0})
        p_int = t.op("Reshape", [p_int, t.op("Shape", [p])])
        ones = const(t, 1.0, np.float32)
        pv = t.op("MatMulIntegerToFloat", [p_int, v, ones, v_scale], domain="com.microsoft")
    else:
        pv = t.op("Mul", [t.op("MatMul", [_simulated_p(t, t.op("Div", [p, p_max]), levels), v]), v_scale])
    return t.op("Mul", [pv, p_max])


def _pv_static(t: ir_tape.Tape, p: ir.Value, v: ir.Value, v_scale: ir.Value, fmt: Format) -> ir.Value:
    levels = fmt.p_levels
    if fmt.native:
        p_int = t.op("QuantizeLinear", [p, const(t, 1.0 / levels, np.float32), const(t, 0, np.uint8)])
        return t.op("MatMulIntegerToFloat", [p_int, v, const(t, 1.0, np.float32), v_scale], domain="com.microsoft")
    return t.op("Mul", [t.op("MatMul", [_simulated_p(t, p, levels), v]), v_scale])


def _simulated_p(t: ir_tape.Tape, p: ir.Value, levels: int) -> ir.Value:
    """Round(p·levels) clipped to [0, levels], as integer-valued floats (the 4-bit simulation)."""
    scaled = t.op("Round", [t.op("Mul", [p, const(t, float(levels), np.float32)])])
    return t.op("Clip", [scaled, const(t, 0.0, np.float32), const(t, float(levels), np.float32)])
