"""`linear` (lossy): kernelised attention, linear in the number of tokens.

    O_i = φ(q_i)ᵀ (Σ_j w_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j w_j φ(k_j) + ε)

computed right-to-left, so the cost is O(N·d²) instead of O(N²·d) (Katharopoulos et al. 2020 for
φ = elu+1; T2R for φ = relu). The softmax scale enters as φ(√s·q), φ(√s·k) so it is applied once.
A bias that depends only on the key (a padding mask, `[B, 1|h, 1, Nk]`) is honoured exactly the way
softmax honours it: key j is weighted by w_j = exp(b_j), which is 0 for masked keys. A bias that
varies per query (relative positions, window masks) cannot be expressed and the site is declined.
`prefix=exact` keeps the prefix queries (CLS, registers) on exact softmax attention: they pool the
whole image and are what a classifier head reads.

`fit=ridge` calibrates the map to mimic softmax (ALGORITHMS.md §6, recipe B): per head, an affine
output correction `O·R_h + b_h` ridge-fitted on calibration activations so the linear output
matches the softmax output it replaces; numpy-only and exact to export. `phi=fitted` replaces the
fixed map with per-head Hedgehog maps fitted on calibration activations (`linear_fit.py`, recipe A).
`local=N|HxW` keeps exact softmax on each query's window (or neighbourhood) and the linear map on
the keys outside it, under one normaliser with a fitted per-head mix (`linear_hybrid.py`, LoLCATs).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes import linear_hybrid as H
from attnrewrite.passes.linear_fit import (
    FeatureMaps, fit_feature_maps, has_torch, head_cosine, hedgehog_reference, split,
)
from attnrewrite.passes.ops import const, float_type, key_row, reduce, softmax_attention
from attnrewrite.passes.spatial.common import GLOBAL_TOKENS, only_2d, sequence_prefix, spatial_frame
from attnrewrite.registry import (
    BasePass, Param, Plan, non_negative_int, positive_float, positive_int, show_size, size2d,
)
from attnrewrite.site import AttentionSite


def feature_map(t: ir_tape.Tape, x: ir.Value, phi: str, dtype=np.float32) -> ir.Value:
    """φ(x) ≥ 0 elementwise: elu(x)+1 or relu(x); `dtype` is x's float type."""
    if phi == "elu1":
        return t.op("Add", [t.op("Elu", [x], attributes={"alpha": 1.0}), const(t, 1.0, dtype)])
    return t.op("Relu", [x])


def hedgehog_map(t: ir_tape.Tape, x: ir.Value, w: np.ndarray, b: np.ndarray, dtype) -> ir.Value:
    """[softmax(xW+b), softmax(−xW−b)] per head with fitted W [h, d, m], b [h, 1, m] (`linear_fit.py`)."""
    z = t.op("Add", [t.op("MatMul", [x, const(t, w[None], dtype)]), const(t, b[None], dtype)])
    return t.op("Concat", [t.op("Softmax", [z], attributes={"axis": -1}),
                           t.op("Softmax", [t.op("Neg", [z])], attributes={"axis": -1})], attributes={"axis": -1})


def features(t: ir_tape.Tape, q: ir.Value, k: ir.Value, *, scale: float, phi: str, dtype, maps=None,
             key_weight: ir.Value | None = None) -> tuple[ir.Value, ir.Value]:
    """(φ(Q), φ(K)·w): the fixed map on √s·Q, √s·K, or the fitted maps on raw Q/K (the scale is learnt)."""
    if phi == "fitted" and maps is None:
        raise ValueError("phi=fitted needs fitted maps; the pipeline fits them before rewriting")
    if maps is not None:
        fq, fk = hedgehog_map(t, q, maps.wq, maps.bq, dtype), hedgehog_map(t, k, maps.wk, maps.bk, dtype)
    else:
        root = const(t, math.sqrt(scale), dtype)
        fq = feature_map(t, t.op("Mul", [q, root]), phi, dtype)
        fk = feature_map(t, t.op("Mul", [k, root]), phi, dtype)
    fk = fk if key_weight is None else t.op("Mul", [fk, key_weight])
    width = 2 * maps.wq.shape[2] if maps is not None else None
    for f, x in ((fq, q), (fk, k)):  # the tiled hybrid lays its tiles out from static shapes
        if x.shape is not None and len(x.shape) == 4:
            f.shape = ir.Shape([*x.shape[:3], width or x.shape[3]])
            f.type = x.type
    return fq, fk


def linear_attention(
    t: ir_tape.Tape, graph: ir.Graph, q: ir.Value, k: ir.Value, v: ir.Value, *, scale: float, phi: str,
    eps: float, key_weight: ir.Value | None = None, dtype=None, maps=None,
) -> ir.Value:
    """φ(Q)·(φ(K)ᵀ·V) / (φ(Q)·Σ_j φ(K_j) + ε), all `[B, h, N, ·]`; `key_weight` is `[B|1, h|1, Nk, 1]`."""
    dtype = dtype or float_type(q)  # a Q sliced on the tape has no type of its own
    fq, fk = features(t, q, k, scale=scale, phi=phi, dtype=dtype, maps=maps, key_weight=key_weight)
    kv = t.op("MatMul", [t.op("Transpose", [fk], attributes={"perm": [0, 1, 3, 2]}), v])  # [B,h,m,dv]
    z = reduce(t, graph, "ReduceSum", fk, [2])  # [B,h,1,m]
    numerator = t.op("MatMul", [fq, kv])  # [B,h,Nq,dv]
    denominator = t.op("MatMul", [fq, t.op("Transpose", [z], attributes={"perm": [0, 1, 3, 2]})])  # [B,h,Nq,1]
    return t.op("Div", [numerator, t.op("Add", [denominator, const(t, eps, dtype)])])




# --- the math, defined once (numpy); the ONNX emission above is tested against it -------------


def phi_reference(x: np.ndarray, phi: str) -> np.ndarray:
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0))) if phi == "elu1" else np.maximum(x, 0.0)


def linear_reference(q, k, v, *, scale: float, phi: str, eps: float, key_weight=None, maps=None) -> np.ndarray:
    """φ(√s·q)ᵀ(Σ_j w_j φ(√s·k_j) v_jᵀ) / (φ(√s·q)ᵀ Σ_j w_j φ(√s·k_j) + ε), in float64; with fitted
    `maps`, φ_q(q) and φ_k(k) of `linear_fit.hedgehog_reference` instead."""
    fq, fk = features_reference(q, k, scale=scale, phi=phi, maps=maps, key_weight=key_weight)
    kv = np.swapaxes(fk, -1, -2) @ v.astype(np.float64)
    z = fk.sum(axis=-2, keepdims=True)
    return (fq @ kv) / (fq @ np.swapaxes(z, -1, -2) + eps)


def features_reference(q, k, *, scale: float, phi: str, maps=None, key_weight=None) -> tuple[np.ndarray, np.ndarray]:
    """(φ(q), φ(k)·w) in float64, as `features` emits them."""
    if maps is not None:
        fq, fk = hedgehog_reference(q, maps.wq, maps.bq), hedgehog_reference(k, maps.wk, maps.bk)
    else:
        root = np.sqrt(scale)
        fq = phi_reference(q.astype(np.float64) * root, phi)
        fk = phi_reference(k.astype(np.float64) * root, phi)
    return fq, (fk if key_weight is None else fk * key_weight)


def key_weight_reference(bias: np.ndarray | None) -> np.ndarray | None:
    """exp(b_j − max b) per key, shaped [B|1, h|1, Nk, 1] (one query row of a per-key bias)."""
    if bias is None:
        return None
    b = bias.astype(np.float64)
    while b.ndim < 4:
        b = b[None]
    b = b[:, :, :1, :]
    return np.swapaxes(np.exp(b - b.max(axis=-1, keepdims=True)), -1, -2)


def fit_output_correction(approx: np.ndarray, target: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Per head: argmin ‖[Ô 1]·[R; b] − O‖² + λ‖R − I‖², returning R [h, d, d] and b [h, 1, d].

    `approx`/`target` are `[B, h, N, d]`. λ is `ridge` times the mean feature energy, so it is
    scale-free; the prior pulls R towards the identity (no correction) when data are scarce.
    """
    heads, d = approx.shape[1], approx.shape[3]
    rs, bs = [], []
    for h in range(heads):
        x = approx[:, h].reshape(-1, d).astype(np.float64)
        y = target[:, h].reshape(-1, d).astype(np.float64)
        xa = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
        lam = ridge * max(float(np.mean(x * x)) * x.shape[0], 1e-12)
        prior = np.concatenate([np.eye(d), np.zeros((1, d))], axis=0)
        reg = lam * np.eye(d + 1)
        reg[d, d] = lam * 1e-6  # the offset is nearly free
        sol = np.linalg.solve(xa.T @ xa + reg, xa.T @ y + reg @ prior)
        rs.append(sol[:d])
        bs.append(sol[d:])
    return np.stack(rs).astype(np.float32), np.stack(bs).astype(np.float32)


def local_size(text: str) -> tuple[int, ...] | None:
    """`none` → None; otherwise a window/kernel size as `size2d` reads it."""
    return None if text == "none" else size2d(text)


@dataclasses.dataclass(frozen=True)
class LinearPlan(Plan):
    """`correction` is the per-head `(R [h, d, d], b [h, 1, d])` that `fit=ridge` fitted, once fitted;
    `maps` the feature maps `phi=fitted` fitted; `local` the exact local set of `local=...` and `gamma`
    its fitted per-head mix; `fit_report` what fitting measured on held-out samples, per head."""

    correction: tuple[np.ndarray, np.ndarray] | None = None
    maps: FeatureMaps | None = None
    local: H.LocalSet | None = None
    gamma: np.ndarray | None = None
    fit_report: dict | None = None

    def summary(self) -> dict:
        return dict(self.fit_report or {})


class LinearPass(BasePass):
    name = "linear"
    exact = False
    description = ("kernelised linear attention φ(Q)(φ(K)ᵀV) with φ = elu+1, relu or fitted maps; cost linear in "
                   "tokens; local=W adds exact softmax on a local window (LoLCATs hybrid)")
    params = (
        Param("phi", str, "elu1", "feature map; fitted: Hedgehog maps fitted per head on calibration activations",
              choices=("elu1", "relu", "fitted")),
        Param("dim", positive_int, 64, "phi=fitted: features per map half (2·dim features)"),
        Param("steps", positive_int, 300, "phi=fitted: Adam steps per site"),
        Param("objective", str, "attn", "phi=fitted: attn (KL to softmax weights, Hedgehog) or output (MSE, LoLCATs)",
              choices=("attn", "output")),
        Param("seed", non_negative_int, 0, "phi=fitted: initialisation and row sampling seed"),
        Param("eps", positive_float, 1e-6, "added to the normaliser"),
        Param("prefix", str, "linear", "exact: prefix tokens (CLS, registers) keep softmax attention",
              choices=("linear", "exact")),
        Param("fit", str, "none", "ridge: per-head affine output correction fitted on calibration activations",
              choices=("none", "ridge")),
        Param("ridge", positive_float, 1e-2, "ridge strength for fit=ridge (relative to feature energy)"),
        Param("local", local_size, None,
              "none, or N / HxW: exact softmax on each query's local set, linear outside it, one normaliser, "
              "per-head mix fitted on --calib (prefix tokens then stay exact)",
              show=lambda v: "none" if v is None else show_size(v)),
        Param("local_kind", str, "auto", "local set: window (Swin windows; blocks on text), neighborhood "
              "(NATTEN K×K; a sliding window on text), or auto: windows on a grid, a sliding window on text",
              choices=("auto", "window", "neighborhood")),
        Param("joint", str, "true", "local=... with phi=fitted: then train maps and γ together on the hybrid's output "
              "(LoLCATs' attention transfer; needs torch)", choices=("true", "false")),
        GLOBAL_TOKENS,
    )

    def fit(self, site: AttentionSite, acts: dict[str, np.ndarray], plan: LinearPlan) -> LinearPlan | str:
        """Fit the feature maps, the local mix and/or the output correction on this site's calibration Q,
        K, V, bias and softmax output; a string (the reason) when fitting failed and the site keeps its
        attention."""
        options = plan.options
        q, k, v, target = acts["q"], acts["k"], acts["v"], acts["output"]
        broken = [name for name, x in (("Q", q), ("K", k), ("V", v), ("the attention output", target))
                  if not np.isfinite(x).all()]
        if broken:
            return (f"the calibration activations are not finite here ({', '.join(broken)} hold NaN or inf), so "
                    "nothing can be fitted on them; the site keeps its softmax attention")
        weight = key_weight_reference(acts.get("bias"))
        prefix = plan.local.prefix if plan.local else (site.prefix_tokens or 0) if options["prefix"] == "exact" else 0
        report = {}
        if options["phi"] == "fitted":
            result = fit_feature_maps(q, k, v, target, scale=site.scale, dim=options["dim"], steps=options["steps"],
                                      objective=options["objective"], seed=options["seed"], prefix=prefix,
                                      key_weight=weight)
            if result.failure:
                return f"phi=fitted: {result.failure}; the site keeps its softmax attention"
            report = {"fitted with": result.backend,
                      "held-out weight KL before (elu1)": result.kl_before, "held-out weight KL after": result.kl_after,
                      "held-out output cosine before (elu1)": result.cosine_before,
                      "held-out output cosine after": result.cosine_after}
            plan = dataclasses.replace(plan, maps=result.maps)
        if plan.local is not None:
            plan, mix_report = self._fit_local(site, acts, plan, weight)
            report.update(mix_report)
        plan = dataclasses.replace(plan, fit_report=report or None)
        if options["fit"] != "ridge":
            return plan
        approx = self._approximate(site, q, k, v, acts.get("bias"), plan, weight)
        return dataclasses.replace(plan, correction=fit_output_correction(approx[:, :, prefix:], target[:, :, prefix:],
                                                                          options["ridge"]))

    def _fit_local(self, site, acts, plan: LinearPlan, weight) -> tuple[LinearPlan, dict]:
        """γ per head on the fit samples; the hybrid's output cosine on the held-out ones."""
        q, k, v, target = acts["q"], acts["k"], acts["v"], acts["output"]
        samples, n = q.shape[0], q.shape[2]
        fit_part, held = split(samples)
        rows = np.arange(plan.local.prefix, n)
        rows = np.random.default_rng(plan.options["seed"]).permutation(rows)[:H.MAX_ROWS] if rows.size > H.MAX_ROWS else rows
        allowed = plan.local.allowed()

        def parts(part):
            fq, fk = features_reference(q[part], k[part], scale=site.scale, phi=plan.options["phi"], maps=plan.maps,
                                        key_weight=_samples(weight, part, samples))
            return H.hybrid_parts(q[part], k[part], v[part], scale=site.scale, allowed=allowed, fq=fq, fk=fk,
                                  bias=_samples(acts.get("bias"), part, samples), rows=rows)

        gamma = H.fit_mixing(parts(fit_part), target[fit_part][:, :, rows])
        joint = "no"
        if plan.maps is not None and plan.options["joint"] == "true":
            joint = "torch is not installed: maps and γ fitted separately"
            if has_torch():
                refined = H.refine_jointly(q[fit_part], k[fit_part], v[fit_part], target[fit_part], scale=site.scale,
                                           allowed=allowed, rows=rows, maps=plan.maps, gamma=gamma,
                                           steps=plan.options["steps"], key_weight=_samples(weight, fit_part, samples),
                                           bias=_samples(acts.get("bias"), fit_part, samples))
                if isinstance(refined, str):
                    joint = refined + "; the separately fitted maps and γ are kept"
                else:
                    joint = "yes (torch, output MSE)"
                    plan = dataclasses.replace(plan, maps=refined[0])
                    gamma = refined[1]
        held_parts = parts(held)
        y = target[held][:, :, rows]
        return dataclasses.replace(plan, gamma=gamma), {
            "local set": f"{plan.local.kind} {'x'.join(map(str, plan.options['local']))}",
            "maps and γ refined jointly": joint,
            "mix γ (local weight)": [round(float(g), 4) for g in gamma],
            "held-out output cosine, local+linear": head_cosine(held_parts.mix(gamma), y),
            "held-out output cosine, local+linear at γ=0.1": head_cosine(held_parts.mix(
                np.full(len(gamma), H.GAMMA_INIT)), y)}

    def _approximate(self, site, q, k, v, bias, plan: LinearPlan, weight) -> np.ndarray:
        """This plan's output on calibration activations (before any output correction)."""
        if plan.local is not None:
            fq, fk = features_reference(q, k, scale=site.scale, phi=plan.options["phi"], maps=plan.maps, key_weight=weight)
            return H.hybrid_reference(q, k, v, scale=site.scale, allowed=plan.local.allowed(), gamma=plan.gamma,
                                      fq=fq, fk=fk, bias=bias)
        out = linear_reference(q, k, v, scale=site.scale, phi=plan.options["phi"], eps=plan.options["eps"],
                               key_weight=weight, maps=plan.maps)
        prefix = (site.prefix_tokens or 0) if plan.options["prefix"] == "exact" else 0
        return np.concatenate([np.zeros_like(out[:, :, :prefix]), out[:, :, prefix:]], axis=2)

    def applies(self, site: AttentionSite, options: dict) -> str | LinearPlan:
        if not site.bias_per_key:
            return f"{site.bias_kind} bias varies per query (e.g. relative positions or window masks); linear attention can only weight keys"
        if options["prefix"] == "exact" and site.prefix_tokens is None and options["local"] is None:
            return "prefix=exact needs known prefix tokens (no patch grid traced)"
        fitted = options["phi"] == "fitted"
        local = None
        if options["local"] is not None:
            local = _local_set(site, options)
            if isinstance(local, str):
                return local
        return LinearPlan(options, needs_fit=options["fit"] == "ridge" or fitted or local is not None,
                          needs_calibration=fitted or local is not None, local=local)

    def rewrite(self, graph: ir.Graph, site: AttentionSite, plan: LinearPlan) -> ir.Value:
        t = ir_tape.Tape(graph)
        options = plan.options
        weight = None
        if site.bias is not None:
            # softmax weights keys by exp(b_j); the max-shift keeps exp finite and cancels in the ratio
            b = key_row(t, site.bias)  # bias_per_key: any row stands for all
            rank = len(b.shape)
            if rank < 4:
                b = t.op("Unsqueeze", [b, const(t, list(range(4 - rank)))])
            shifted = t.op("Sub", [b, reduce(t, graph, "ReduceMax", b, [3])])
            weight = t.op("Transpose", [t.op("Exp", [shifted])], attributes={"perm": [0, 1, 3, 2]})
        dtype = float_type(site.q)
        if plan.local is not None:
            from attnrewrite.passes.spatial.emit import emit_hybrid_tiled

            local = plan.local
            fq, fk = features(t, site.q, site.k, scale=site.scale, phi=options["phi"], dtype=dtype, maps=plan.maps,
                              key_weight=weight)
            out = emit_hybrid_tiled(t, site.q, site.k, site.v, fq, fk, plan.gamma, scale=site.scale, bias=site.bias,
                                    grid=local.grid, prefix=local.prefix, rule_y=local.rule_y, rule_x=local.rule_x)
            return _corrected_after(t, out, plan.correction, local.prefix, site.q_len, dtype)
        prefix = site.prefix_tokens or 0
        if options["prefix"] != "exact" or prefix == 0:
            out = linear_attention(
                t, graph, site.q, site.k, site.v, scale=site.scale, phi=options["phi"], eps=options["eps"], key_weight=weight,
                maps=plan.maps,
            )
            return _corrected(t, out, plan.correction, dtype)
        q_len = site.q_len if site.q_len is not None else np.iinfo(np.int64).max
        q_prefix = t.op("Slice", [site.q, const(t, [0]), const(t, [prefix]), const(t, [2])])
        q_grid = t.op("Slice", [site.q, const(t, [prefix]), const(t, [q_len]), const(t, [2])])
        exact = softmax_attention(t, q_prefix, site.k, site.v, site.scale, site.bias, dtype)
        lin = linear_attention(
            t, graph, q_grid, site.k, site.v, scale=site.scale, phi=options["phi"], eps=options["eps"], key_weight=weight,
            dtype=dtype, maps=plan.maps,
        )
        return t.op("Concat", [exact, _corrected(t, lin, plan.correction, dtype)], attributes={"axis": 2})


def _local_set(site: AttentionSite, options: dict) -> H.LocalSet | str:
    """The exact local set of `local=...` at this site, or why there is none."""
    reason, grid, prefix = spatial_frame(site, options, allow_1d=True)
    if reason:
        return reason
    if site.q_len is None:
        return "local=...: the token count is dynamic, so the local set cannot be laid out (export with a fixed size)"
    if site.suffix_tokens:
        return "local=...: tokens follow the grid (detection tokens); not supported with a local set"
    size = options["local"]
    if grid is None:
        if size[0] != size[1]:
            return "1-D sequences take a single local length (local=N)"
        reason, prefix = sequence_prefix(site, options)
        return reason or H.local_set(_kind(options, "neighborhood"), size, None, prefix, site.q_len - prefix)
    reason = only_2d(grid, "local=...")
    if reason:
        return reason
    if len(size) != 2:
        return f"local={show_size(size)} does not fit the {grid[0]}x{grid[1]} grid; give HxW"
    return H.local_set(_kind(options, "window"), size, grid, prefix, site.q_len - prefix)


def _kind(options: dict, auto: str) -> str:
    """`auto` is LoLCATs' sliding window on text (every token sees its nearest neighbours, where blocks
    leave a token at a block's edge with half a window: MiniLM's sentence cosine 0.978 vs 0.975 at 16)
    and Swin windows on a grid (the tiled emission's fast case)."""
    return auto if options["local_kind"] == "auto" else options["local_kind"]


def _samples(x: np.ndarray | None, part: slice, samples: int) -> np.ndarray | None:
    """The samples `part` of a per-sample array; a broadcast one (leading dim 1) as it is."""
    if x is None or x.ndim < 4 or x.shape[0] != samples or samples == 1:
        return x
    return x[part]


def _corrected_after(t: ir_tape.Tape, out: ir.Value, correction, prefix: int, q_len: int, dtype) -> ir.Value:
    """The output correction on the tokens after the (exact) prefix rows."""
    if correction is None:
        return out
    if not prefix:
        return _corrected(t, out, correction, dtype)
    head = t.op("Slice", [out, const(t, [0]), const(t, [prefix]), const(t, [2])])
    tail = t.op("Slice", [out, const(t, [prefix]), const(t, [q_len]), const(t, [2])])
    return t.op("Concat", [head, _corrected(t, tail, correction, dtype)], attributes={"axis": 2})


def _corrected(t: ir_tape.Tape, out: ir.Value, correction: tuple[np.ndarray, np.ndarray] | None, dtype) -> ir.Value:
    """O·R_h + b_h per head, with the fitted constants (identity when nothing was fitted)."""
    if correction is None:
        return out
    r = t.op("Constant", [], attributes={"value": ir.tensor(correction[0][None].astype(dtype))})  # [1, h, d, d]
    b = t.op("Constant", [], attributes={"value": ir.tensor(correction[1][None].astype(dtype))})  # [1, h, 1, d]
    return t.op("Add", [t.op("MatMul", [out, r]), b])


LINEAR = LinearPass()
