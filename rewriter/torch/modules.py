"""The variant attention of one site as an `nn.Module`: what the torch front-end puts in its place.

Each module computes what the pass's ONNX subgraph computes, from the same definitions: spatial
passes attend over `pass.allowed(site, plan)` (the reference masks of `passes/spatial/reference.py`),
linear attention follows `linear_reference` / `linear_hybrid.hybrid_reference`, and anything fitted
(feature maps, the hybrid's mix, the ridge correction) is an `nn.Parameter`, so the module trains.
Masked softmax is written densely (an additive mask; exported to ONNX as plain ops): exact and
trainable, but not faster than the original (the ONNX passes are the fast path).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnrewrite.passes.linear_fit import hedgehog_torch
from attnrewrite.passes.quantize import GROUP_AXES, block_size
from attnrewrite.passes.spatial.tables import bias_floor, masked_value


def _softmax_attention(q, k, v, scale: float, additive):
    logits = scale * q @ k.transpose(-1, -2)
    if additive is not None:
        logits = logits + additive
    return torch.softmax(logits, dim=-1) @ v


class SoftmaxAttention(nn.Module):
    """`sdpa`: one canonical softmax(scale·QKᵀ + bias)·V."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v, bias=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)


#: how a MaskedAttention computes: flex (FlexAttention over a BlockMask), dense (softmax with an
#: additive mask), auto (flex on CUDA, dense on the CPU)
BACKENDS = ("auto", "flex", "dense")


class MaskedAttention(nn.Module):
    """Spatial passes (and `paro:bits=16`): softmax over each query's allowed keys (a static mask
    [N, N], or [heads, N, N]); biases are clamped at the same floor as the ONNX emission, so a fully
    padded window cannot make a NaN row.

    Two ways to compute the same thing. FlexAttention with a BlockMask built from `allowed` skips the
    key blocks a query block never sees: the fast path on a GPU (compiled, with a backward). The dense
    additive mask is what torch.onnx exports (FlexAttention has no ONNX form) and what trains on the
    CPU (FlexAttention has no CPU backward; its CPU forward outside torch.compile materialises every
    score anyway), so `auto` uses it there, and whenever the module is being exported. `zero_keys`
    (HaloNet's zero-padded keys, logit 0 and value 0) only exist on the dense path."""

    def __init__(self, allowed: np.ndarray, scale: float, zero_keys: np.ndarray | None = None, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"{backend=} must be one of {BACKENDS}")
        self.scale, self.backend = scale, backend
        self.register_buffer("mask", torch.as_tensor(np.where(allowed, 0.0, masked_value(np.float32)), dtype=torch.float32))
        counts = None if zero_keys is None or not np.any(zero_keys) else torch.tensor(np.array(zero_keys, np.float32))
        self.register_buffer("zero_keys", counts)
        self._block_masks: dict = {}

    def forward(self, q, k, v, bias=None):
        if bias is not None:
            bias = torch.clamp(bias, min=bias_floor(np.float32))
        if self.uses_flex(q, k, v):
            return self._flex(q, k, v, bias)
        additive = self.mask if bias is None else self.mask + bias
        if self.zero_keys is None:
            return _softmax_attention(q, k, v, self.scale, additive)
        logits = self.scale * q @ k.transpose(-1, -2) + additive
        top = torch.maximum(logits.amax(-1, keepdim=True), torch.where(self.zero_keys > 0, 0.0, -torch.inf)[:, None])
        e = torch.exp(logits - top)
        return (e @ v) / (e.sum(-1, keepdim=True) + self.zero_keys[:, None] * torch.exp(-top))

    def uses_flex(self, q, *others) -> bool:
        """Whether a call on these inputs runs FlexAttention (see the class docstring for when it cannot)."""
        if self.backend == "dense" or self.zero_keys is not None or torch.compiler.is_exporting():
            return False
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, *others)):
            return False
        return self.backend == "flex" or q.device.type == "cuda"

    def block_mask(self, device):
        """The BlockMask of `allowed` (one per device; batch and heads broadcast)."""
        from torch.nn.attention.flex_attention import create_block_mask

        key = str(device)
        if key not in self._block_masks:
            allowed = (self.mask == 0).to(device)  # the mask is 0 exactly where a key is allowed
            n = allowed.shape[-1]
            if allowed.dim() == 3:  # one mask per head (paro's per-head tables)
                mask_mod, heads = (lambda b, h, qi, ki: allowed[h, qi, ki]), allowed.shape[0]
            else:
                mask_mod, heads = (lambda b, h, qi, ki: allowed[qi, ki]), None
            self._block_masks[key] = create_block_mask(mask_mod, None, heads, n, n, device=device)
        return self._block_masks[key]

    def _flex(self, q, k, v, bias):
        from torch.nn.attention.flex_attention import flex_attention

        score_mod = None
        if bias is not None:
            b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
            pick = [lambda i, n=n: i if n > 1 else 0 for n in b4.shape]  # broadcast axes read index 0

            def score_mod(score, b, h, qi, ki):
                return score + b4[pick[0](b), pick[1](h), pick[2](qi), pick[3](ki)]
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=self.block_mask(q.device), scale=self.scale)


class LinearAttention(nn.Module):
    """`linear`: φ(Q)(φ(K)ᵀV)/(φ(Q)Σφ(K) + ε) with φ elu+1, relu or fitted Hedgehog maps; `prefix`
    rows on exact softmax; with `allowed` (a hybrid's local sets) the LoLCATs window + linear form
    with the per-head mix γ; `correction` the ridge-fitted per-head affine map on the linear rows."""

    def __init__(self, plan, scale: float, heads: int, prefix: int = 0, allowed: np.ndarray | None = None):
        super().__init__()
        options = plan.options
        self.phi, self.eps, self.scale, self.prefix = options["phi"], options["eps"], scale, prefix
        self.maps = None
        if plan.maps is not None:
            self.maps = nn.ParameterList([nn.Parameter(torch.as_tensor(x)) for x in
                                          (plan.maps.wq, plan.maps.bq, plan.maps.wk, plan.maps.bk)])
        self.correction = None
        if plan.correction is not None:
            self.correction = nn.ParameterList([nn.Parameter(torch.as_tensor(x)) for x in plan.correction])
        self.hybrid = allowed is not None
        if self.hybrid:
            self.register_buffer("inside", torch.as_tensor(allowed, dtype=torch.float32))
            gamma = np.clip(np.asarray(plan.gamma, np.float64), 1e-6, 1 - 1e-6)
            self.gamma_logit = nn.Parameter(torch.as_tensor(np.log(gamma / (1 - gamma)), dtype=torch.float32))

    def features(self, q, k):
        if self.maps is not None:
            wq, bq, wk, bk = self.maps
            return hedgehog_torch(q, wq, bq), hedgehog_torch(k, wk, bk)
        root = math.sqrt(self.scale)
        act = (lambda x: F.elu(x) + 1) if self.phi == "elu1" else F.relu
        return act(q * root), act(k * root)

    def forward(self, q, k, v, bias=None):
        fq, fk = self.features(q, k)
        if bias is not None:  # softmax weights key j by exp(b_j); any row of a per-key bias stands for all
            row = bias[..., :1, :]
            fk = fk * torch.exp(row - row.amax(-1, keepdim=True)).transpose(-1, -2)
        if self.hybrid:
            out = self._hybrid(q, k, v, fq, fk, bias)
        else:
            kv = fk.transpose(-1, -2) @ v
            z = fk.sum(-2, keepdim=True).transpose(-1, -2)
            out = (fq @ kv) / (fq @ z + self.eps)
            if self.prefix:
                rows = None if bias is None else bias if bias.shape[-2] == 1 else bias[..., :self.prefix, :]
                exact = _softmax_attention(q[:, :, :self.prefix], k, v, self.scale, rows)
                out = torch.cat([exact, out[:, :, self.prefix:]], dim=2)
        return self._corrected(out)

    def _hybrid(self, q, k, v, fq, fk, bias):
        logits = self.scale * q @ k.transpose(-1, -2)
        if bias is not None:
            logits = logits + torch.clamp(bias, min=bias_floor(np.float32))
        local = logits + (1 - self.inside) * masked_value(np.float32)
        e = torch.exp(local - local.amax(-1, keepdim=True)) * self.inside
        far = (fq @ fk.transpose(-1, -2)) * (1 - self.inside)
        g = torch.sigmoid(self.gamma_logit).view(1, -1, 1, 1)
        return (g * (e @ v) + (1 - g) * (far @ v)) / (g * e.sum(-1, keepdim=True) + (1 - g) * far.sum(-1, keepdim=True))

    def _corrected(self, out):
        if self.correction is None:
            return out
        r, b = self.correction
        tail = out[:, :, self.prefix:] @ r.unsqueeze(0) + b.unsqueeze(0)
        return torch.cat([out[:, :, :self.prefix], tail], dim=2) if self.prefix else tail


class FoldedHeads(nn.Module):
    """A variant module at a site whose Q/K/V are [B·heads, tokens, dim] (`nn.MultiheadAttention`
    returning its weights): the variant sees one head per batch entry, and the output goes back to 3-D."""

    def __init__(self, variant: nn.Module):
        super().__init__()
        self.variant = variant

    def forward(self, q, k, v, bias=None):
        bias = None if bias is None else bias.unsqueeze(1)
        return self.variant(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), bias).squeeze(1)


def _round(x):
    """Round half to even (as QuantizeLinear) with a straight-through gradient, so the module trains."""
    return x + (torch.round(x) - x).detach()


def _group_absmax(x, gran: str):
    """`quantize.group_absmax` in torch: max |x| per tensor, head, token or block of tokens."""
    a = x.abs()
    if gran in GROUP_AXES:
        return a.amax(dim=GROUP_AXES[gran], keepdim=True)
    size = block_size(gran)
    b, h, n, d = a.shape
    nb = -(-n // size)
    padded = F.pad(a, (0, 0, 0, nb * size - n))
    per_block = padded.reshape(b, h, nb, size * d).amax(-1, keepdim=True)
    return per_block.repeat_interleave(size, dim=2)[:, :, :n]


class QuantAttention(nn.Module):
    """`int8`, `int4`, `quant` and `paro:bits=8|4`: `quantize.quant_attention_reference` in torch
    (symmetric integers, round half to even, saturating; K smoothing; V per channel; P per row at
    rowmax/levels), with `keep` ([heads, N, N], paro's kept blocks) restricting the keys. Rounding passes
    gradients straight through, and fitted static scales are `nn.Parameter`s, so the module trains
    (quantisation-aware). Dynamic scales are computed from each input, as the ONNX graph does."""

    def __init__(self, cfg, scale: float, keep: np.ndarray | None = None):
        super().__init__()
        self.cfg, self.scale = cfg, scale
        self.static = None
        if cfg.static is not None:
            self.static = nn.ParameterDict({k: nn.Parameter(torch.tensor(np.array(v, np.float32)))
                                            for k, v in cfg.static.items()})
        self.register_buffer("keep", None if keep is None else torch.as_tensor(np.asarray(keep, bool)))

    def scales(self, q, k, v) -> dict:
        if self.static is not None:
            return {name: torch.clamp(s, min=1e-30) for name, s in self.static.items()}
        cfg, out = self.cfg, {}
        with torch.no_grad():
            if cfg.qk is not None:
                out["q"] = torch.clamp(_group_absmax(q, cfg.granularity) / cfg.qk.q_levels, min=1e-30)
                out["k"] = torch.clamp(_group_absmax(k, cfg.granularity) / cfg.qk.k_levels, min=1e-30)
            if cfg.pv is not None:
                out["v"] = torch.clamp(v.abs().amax(dim=2, keepdim=True) / cfg.pv.v_levels, min=1e-30)
        return out

    def forward(self, q, k, v, bias=None):
        cfg = self.cfg
        if cfg.smooth_k:
            k = k - k.mean(dim=2, keepdim=True)
        v_mean = v.mean(dim=2, keepdim=True) if cfg.smooth_v else None
        if v_mean is not None:
            v = v - v_mean
        s = self.scales(q, k, v)
        if cfg.qk is None:
            logits = (q * self.scale) @ k.transpose(-1, -2)
        else:
            lq, lk = cfg.qk.q_levels, cfg.qk.k_levels
            q_int = torch.clamp(_round(q / s["q"]), -lq, lq)
            k_int = torch.clamp(_round(k / s["k"]), -lk, lk)
            logits = (q_int @ k_int.transpose(-1, -2)) * (s["q"] * self.scale) * s["k"].transpose(-1, -2)
        if bias is not None:
            logits = logits + bias
        if self.keep is not None:
            logits = logits.masked_fill(~self.keep, -torch.inf)
        p = torch.softmax(logits, dim=-1)
        if cfg.pv is None:
            out = p @ v
        else:
            levels = cfg.pv.p_levels
            v_int = torch.clamp(_round(v / s["v"]), -cfg.pv.v_levels, cfg.pv.v_levels)
            p_max = p.amax(dim=-1, keepdim=True) if cfg.p_scale == "row" else torch.ones_like(p[..., :1])
            p_int = torch.clamp(_round(p / (p_max / levels)), 0, levels)
            out = (p_int @ v_int) * (s["v"] / levels) * p_max
        return out + v_mean if v_mean is not None else out


def additive_mask(mask):
    """A boolean attention mask (True: attend) as the additive bias the variants take (numpy or torch)."""
    if isinstance(mask, np.ndarray):
        return np.where(mask, np.float32(0), masked_value(np.float32)).astype(np.float32)
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, masked_value(np.float32))


class BoolMask(nn.Module):
    """A variant module at a site whose bias is a boolean mask (transformers' SDPA path)."""

    def __init__(self, variant: nn.Module):
        super().__init__()
        self.variant = variant

    def forward(self, q, k, v, bias=None):
        if bias is not None and bias.dtype == torch.bool:
            bias = additive_mask(bias)
        return self.variant(q, k, v, bias)
