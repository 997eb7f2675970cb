"""`quant` (lossy): softmax attention with Q·Kᵀ and/or P·V on integers (SageAttention-style).

    O = softmax(scale · Q̂·K̂ᵀ + bias) · V̂        (hats: quantised; see passes/quantize.py for the formats)

`int8` and `int4` are the same pass with `bits` preset. At 8 bits Q·Kᵀ runs as ORT's uint8 × int8
`MatMulIntegerToFloat` (dequantisation fused, per-row × per-column scales), each row of P is quantised
by one per-axis `QuantizeLinear` at rowmax/127 (SageAttention's P̃; `p_scale=static` uses 1/127, which
is faster but rounds diffuse rows of many keys to zero) and P·V runs the same kernel. At 4 bits ORT CPU has no
integer kernel: the graph computes the same integers as floats (an accuracy simulation).
Dense INT8 attention barely pays on CPU (the N×N tensor's memory traffic dominates the time); the
speed comes with block sparsity (`paro`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes import quantize as Qz
from attnrewrite.passes.ops import float_type
from attnrewrite.registry import BasePass, Param, Plan
from attnrewrite.site import AttentionSite


def bool_param(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def bits_param(text: str) -> int:
    value = int(text)
    if value not in (4, 8):
        raise ValueError("bits must be 8 or 4 (16 means float: use sdpa, or paro:bits=16 for sparsity only)")
    return value


def product_format(choice: str, bits: int) -> Qz.Format | None:
    """`int` follows `bits`; `int8`/`int4` pick the width of this product; `fp` keeps it float."""
    if choice == "fp":
        return None
    return Qz.FORMATS[bits if choice == "int" else int(choice[3:])]


#: per-axis QuantizeLinear (P per row) and Clip with min/max inputs
MIN_OPSET = 13


def opset_reason(site: AttentionSite) -> str | None:
    """Why the quantised emission cannot go into this site's model (None: it can)."""
    graph = site.anchor.graph if site.anchor is not None else None
    opset = graph.opset_imports.get("", MIN_OPSET) if graph is not None else MIN_OPSET
    return f"quantised attention needs opset >= {MIN_OPSET} (the model has {opset})" if opset < MIN_OPSET else None


def format_label(fmt: Qz.Format | None) -> str:
    if fmt is None:
        return "float"
    return f"int{fmt.bits}" + ("" if fmt.native else " (simulated in float on ORT CPU)")


def fit_static_scales(q: np.ndarray, k: np.ndarray, v: np.ndarray, cfg: Qz.QuantConfig) -> dict[str, np.ndarray]:
    """The dynamic scales of every calibration sample, maxed over the samples.

    K (and V) are smoothed per sample first when the graph smooths them; values above the fitted
    range saturate."""
    k = Qz.smooth(k) if cfg.smooth_k else k
    v = Qz.smooth(v) if cfg.smooth_v else v
    per_sample = Qz.operand_scales(q, k, v, dataclasses.replace(cfg, static=None))
    return {name: scale.max(axis=0, keepdims=True) for name, scale in per_sample.items()}


@dataclasses.dataclass(frozen=True)
class QuantPlan(Plan):
    config: Qz.QuantConfig | None = None

    def summary(self) -> dict:
        cfg = self.config
        origin = "static (fitted on calibration)" if cfg.static is not None else "dynamic (computed in the graph)"
        p_text = ""
        if cfg.pv is not None:
            p_text = f", P per row (rowmax/{cfg.pv.p_levels})" if cfg.p_scale == "row" else f", P static 1/{cfg.pv.p_levels}"
        smoothed = [name for name, on in (("K", cfg.smooth_k), ("V", cfg.smooth_v)) if on]
        out = {"Q·Kᵀ": format_label(cfg.qk), "P·V": format_label(cfg.pv),
               "scales": f"{origin}, Q/K per {cfg.granularity}, V per channel{p_text}",
               "smoothing": ", ".join(smoothed) or "none"}
        for name, arr in (cfg.static or {}).items():
            out[f"{name} scale per head"] = [float(f"{x:.4g}") for x in _largest_per_head(arr)]
        return out


def _largest_per_head(scales: np.ndarray) -> np.ndarray:
    """The largest scale of each head (axis 1; one value when the scale is shared): it bounds the head's error."""
    if scales.shape[1] == 1:
        return scales.reshape(-1)[:1]
    return scales.max(axis=tuple(i for i in range(scales.ndim) if i != 1))


class QuantPass(BasePass):
    exact = False

    def __init__(self, name: str = "quant", bits: int = 8):
        self.name = name
        self.description = (
            f"softmax attention on {'integers' if name == 'quant' else f'INT{bits}'}: Q·Kᵀ and P·V quantised "
            "(SageAttention: K smoothing, per-group Q/K scales, P per row at rowmax/levels); INT4 is simulated on ORT CPU")
        self.params = (
            Param("bits", bits_param, bits, "8: ORT integer kernels; 4: simulated in float on ORT CPU"),
            Param("qk", str, "int", "Q·Kᵀ: int (at bits), int8, int4 or fp", choices=("int", "int8", "int4", "fp")),
            Param("pv", str, "int", "P·V: int (at bits), int8, int4 or fp", choices=("int", "int8", "int4", "fp")),
            Param("smooth_k", bool_param, True, "subtract K's token mean before quantising (exact in float)",
                  show=lambda b: str(b).lower()),
            Param("smooth_v", bool_param, False, "subtract V's channel mean, add it back after P·V (exact in float)",
                  show=lambda b: str(b).lower()),
            Param("granularity", Qz.granularity, "token", "one Q/K scale per tensor, head, token or block:B tokens"),
            Param("scales", str, "dynamic", "dynamic: computed in the graph; static: fitted on --calib data",
                  choices=("dynamic", "static")),
            Param("p_scale", str, "row", "row: each row of P at rowmax/levels (exact for long diffuse rows); "
                  "static: P at 1/levels (faster; rows of many small weights round to zero)", choices=("row", "static")),
        )

    def config(self, options: dict) -> Qz.QuantConfig:
        bits = options["bits"]
        return Qz.QuantConfig(qk=product_format(options["qk"], bits), pv=product_format(options["pv"], bits),
                              smooth_k=options["smooth_k"], smooth_v=options["smooth_v"],
                              granularity=options["granularity"], p_scale=options["p_scale"])

    def applies(self, site: AttentionSite, options: dict) -> str | QuantPlan:
        if float_type(site.q) != np.float32:
            return f"quantised attention is built for float32 sites (this one computes in {np.dtype(float_type(site.q)).name})"
        if reason := opset_reason(site):
            return reason
        gran, static = options["granularity"], options["scales"] == "static"
        positional = gran == "token" or gran.startswith("block:")
        if (static and positional or gran.startswith("block:")) and (site.q_len is None or site.kv_len is None):
            return f"granularity={gran}{' with static scales' if static else ''} needs a static token count"
        if static and positional and site.q_len != site.kv_len:
            return "static per-token scales need self-attention (one token axis for Q and K)"
        return QuantPlan(options, needs_fit=static, needs_calibration=static, config=self.config(options))

    def fit(self, site: AttentionSite, acts: dict[str, np.ndarray], plan: QuantPlan) -> QuantPlan:
        static = fit_static_scales(acts["q"], acts["k"], acts["v"], plan.config)
        return dataclasses.replace(plan, config=dataclasses.replace(plan.config, static=static))

    def rewrite(self, graph: ir.Graph, site: AttentionSite, plan: QuantPlan) -> ir.Value:
        t = ir_tape.Tape(graph)
        cfg = plan.config
        ops = Qz.emit_operands(t, graph, site.q, site.k, site.v, cfg, (site.q_len, site.kv_len))
        logits = Qz.emit_logits(t, ops.q, ops.k, ops.q_scale, ops.k_scale, site.scale, cfg.qk)
        if site.bias is not None:
            logits = t.op("Add", [logits, site.bias])
        probs = t.op("Softmax", [logits], attributes={"axis": -1})
        out = Qz.emit_pv(t, graph, probs, ops.v, ops.v_scale, cfg.pv, cfg.p_scale)
        return t.op("Add", [out, ops.v_mean]) if ops.v_mean is not None else out


QUANT = QuantPass()
INT8 = QuantPass("int8", 8)
INT4 = QuantPass("int4", 4)
