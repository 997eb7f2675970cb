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


class MaskedAttention(nn.Module):
    """Spatial passes: softmax over each query's allowed keys (a static mask); biases are clamped at
    the same floor as the ONNX emission, so a fully padded window cannot make a NaN row."""

    def __init__(self, allowed: np.ndarray, scale: float):
        super().__init__()
        self.scale = scale
        self.register_buffer("mask", torch.as_tensor(np.where(allowed, 0.0, masked_value(np.float32)), dtype=torch.float32))

    def forward(self, q, k, v, bias=None):
        additive = self.mask if bias is None else self.mask + torch.clamp(bias, min=bias_floor(np.float32))
        return _softmax_attention(q, k, v, self.scale, additive)


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
