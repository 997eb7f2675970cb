"""`linear:local=...`: exact softmax on a local set of keys, linear attention on the rest.

LoLCATs' window + linear form (`window_tk`, ALGORITHMS.md §6): for query i with local set L(i),

    a_ij = γ_h·exp(s_ij − max_{l∈L(i)} s_il)   j ∈ L(i)      s = scale·q·kᵀ + bias
           (1 − γ_h)·φ(q_i)·φ(k_j)·w_j          j ∉ L(i)      w_j: a padding bias' key weight
    O_i  = Σ_j a_ij v_j / Σ_j a_ij

one normaliser over both parts, with a per-head mixing factor γ_h fitted on calibration data. The
local set is a Swin window or a NATTEN neighbourhood on the token grid (a block or a sliding window on
a 1-D sequence), built from the same axis rules as the `window` and `neighborhood` passes; prefix
tokens are global as there (every query sees them exactly, and they attend exactly to every key). A
local set covering every key is softmax exactly, whatever γ (the anchor the tests pin).

γ is fitted per head by a 1-D search on the output MSE (`fit_mixing`): the hybrid output is a ratio
of two affine functions of γ, so a log-spaced scan plus one refinement finds its minimum without
gradients, in numpy, deterministically.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnrewrite.passes.spatial import tables as S

#: γ before fitting (LoLCATs' initialisation: sigmoid(−2.197))
GAMMA_INIT = 0.1
#: query rows sampled for fitting γ and the held-out report (memory: rows × keys per sample and head)
MAX_ROWS = 256


@dataclasses.dataclass(frozen=True)
class LocalSet:
    """The keys each query attends to exactly: axis rules on a 2-D grid ((1, L) for a sequence) with
    `prefix` global tokens in front."""

    kind: str
    grid: tuple[int, int]
    prefix: int
    rule_y: S.AxisRule
    rule_x: S.AxisRule

    def allowed(self) -> np.ndarray:
        """bool [P+N, P+N]: True on each query's local set (prefix rows and columns all True)."""
        return S.allowed_mask(self.grid, self.prefix, self.rule_y, self.rule_x, "global")


def local_set(kind: str, size: tuple[int, int], grid: tuple[int, int] | None, prefix: int, length: int) -> LocalSet:
    """`window`: non-overlapping windows (blocks on a sequence); `neighborhood`: NATTEN's clamped
    K×K neighbourhood (a sliding window of K on a sequence). `length` counts tokens after the prefix."""
    if grid is None:
        w = min(size[1], length)
        rule = S.window_axis(length, w) if kind == "window" else S.neighborhood_axis(length, w)
        return LocalSet(kind, (1, length), prefix, S.window_axis(1, 1), rule)
    size = tuple(min(s, g) for s, g in zip(size, grid))
    ry, rx = S.rules_window(grid, size) if kind == "window" else S.rules_neighborhood(grid, size)
    return LocalSet(kind, tuple(grid), prefix, ry, rx)


# --- the math, defined once (numpy, float64); the ONNX emission (`spatial.emit.emit_hybrid_tiled`)
# and the fitting use it ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HybridParts:
    """Per query row: the local softmax sums (Σ e·v, Σ e) and the outside-local linear sums (Σ a·v, Σ a)."""

    local_num: np.ndarray
    local_den: np.ndarray
    far_num: np.ndarray
    far_den: np.ndarray

    def mix(self, gamma: np.ndarray) -> np.ndarray:
        """O(γ) with γ per head (broadcast over [S, h, rows, ·])."""
        g = np.asarray(gamma, np.float64).reshape(1, -1, 1, 1)
        return (g * self.local_num + (1 - g) * self.far_num) / (g * self.local_den + (1 - g) * self.far_den)


def hybrid_parts(q, k, v, *, scale: float, allowed: np.ndarray, fq: np.ndarray, fk: np.ndarray, bias=None,
                 rows: np.ndarray | None = None) -> HybridParts:
    """The four sums for query `rows` (all when None); `fq`/`fk` are feature values, `fk` already
    multiplied by the key weights; `bias` broadcasts to [B, h, N, N]."""
    rows = np.arange(q.shape[2]) if rows is None else rows
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = scale * q[:, :, rows] @ np.swapaxes(k, -1, -2)
    if bias is not None:
        b = np.asarray(bias, np.float64)
        b = b.reshape((1,) * (4 - b.ndim) + b.shape)
        logits = logits + (b[:, :, rows] if b.shape[2] != 1 else b)
    inside = allowed[rows][None, None]
    logits = np.where(inside, logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    lin = np.where(inside, 0.0, np.asarray(fq, np.float64)[:, :, rows] @ np.swapaxes(np.asarray(fk, np.float64), -1, -2))
    return HybridParts(e @ v, e.sum(-1, keepdims=True), lin @ v, lin.sum(-1, keepdims=True))


def hybrid_reference(q, k, v, *, scale: float, allowed: np.ndarray, gamma: np.ndarray, fq, fk, bias=None) -> np.ndarray:
    """The hybrid output for every query, MAX_ROWS rows at a time (the dense [rows, N] sums are the
    memory bound at 4k tokens)."""
    chunks = [hybrid_parts(q, k, v, scale=scale, allowed=allowed, fq=fq, fk=fk, bias=bias,
                           rows=np.arange(start, min(start + MAX_ROWS, q.shape[2]))).mix(gamma)
              for start in range(0, q.shape[2], MAX_ROWS)]
    return np.concatenate(chunks, axis=2)


def fit_mixing(parts: HybridParts, target: np.ndarray) -> np.ndarray:
    """Per head, the γ ∈ (0, 1) minimising the output MSE against `target` (same rows): a scan over
    logit(γ) ∈ [−12, 12] in steps of 0.25, then a 0.01-step refinement around the best."""
    heads = target.shape[1]

    def mse(logits: np.ndarray) -> np.ndarray:  # per head, at one logit(γ) per head
        return ((parts.mix(1 / (1 + np.exp(-logits))) - target) ** 2).mean(axis=(0, 2, 3))

    def best_of(candidates: np.ndarray) -> np.ndarray:  # candidates [steps, h] → the best per head
        errors = np.stack([mse(c) for c in candidates])
        return candidates[errors.argmin(0), np.arange(heads)]

    coarse = best_of(np.repeat(np.arange(-12.0, 12.0 + 1e-9, 0.25)[:, None], heads, axis=1))
    fine = best_of(coarse[None, :] + np.arange(-0.25, 0.25 + 1e-9, 0.01)[:, None])
    return (1 / (1 + np.exp(-fine))).astype(np.float32)


def refine_jointly(q, k, v, target, *, scale: float, allowed: np.ndarray, rows: np.ndarray, maps, gamma: np.ndarray,
                   steps: int, key_weight=None, bias=None, lr: float = 3e-3):
    """LoLCATs' attention transfer for the hybrid: fitted maps and the per-head mix trained together on
    the hybrid's output MSE (teacher inputs, these query rows). Needs torch (autograd); returns
    (maps, gamma) or the reason it stopped (a non-finite loss keeps the caller's maps and γ)."""
    import torch

    from attnrewrite.passes.linear_fit import FeatureMaps, hedgehog_torch

    t = {name: torch.as_tensor(np.asarray(x, np.float32)) for name, x in (("q", q[:, :, rows]), ("k", k), ("v", v),
                                                                          ("y", target[:, :, rows]))}
    inside = torch.as_tensor(allowed[rows].astype(np.float32))
    logits = scale * t["q"] @ t["k"].transpose(-1, -2)
    if bias is not None:
        b = torch.as_tensor(np.asarray(bias, np.float32))
        b = b.reshape((1,) * (4 - b.dim()) + tuple(b.shape))
        logits = logits + (b[:, :, rows] if b.shape[2] != 1 else b)
    logits = logits.masked_fill(inside == 0, float("-inf"))
    local = torch.exp(logits - logits.amax(-1, keepdim=True))  # fixed: depends on no parameter
    local_num, local_den = local @ t["v"], local.sum(-1, keepdim=True)
    weight = None if key_weight is None else torch.as_tensor(np.asarray(key_weight, np.float32))
    g0 = np.clip(np.asarray(gamma, np.float64), 1e-4, 1 - 1e-4)
    params = [torch.tensor(np.asarray(x, np.float32), requires_grad=True) for x in (maps.wq, maps.bq, maps.wk, maps.bk)]
    params.append(torch.tensor(np.log(g0 / (1 - g0)).astype(np.float32), requires_grad=True))
    optimiser = torch.optim.Adam(params, lr=lr)

    for _ in range(steps):
        fq, fk = hedgehog_torch(t["q"], params[0], params[1]), hedgehog_torch(t["k"], params[2], params[3])
        if weight is not None:
            fk = fk * weight
        far = (fq @ fk.transpose(-1, -2)) * (1 - inside)
        g = torch.sigmoid(params[4]).view(1, -1, 1, 1)
        out = (g * local_num + (1 - g) * (far @ t["v"])) / (g * local_den + (1 - g) * far.sum(-1, keepdim=True))
        loss = ((out - t["y"]) ** 2).mean()
        if not torch.isfinite(loss):
            return "the joint refinement diverged (non-finite loss)"
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    values = [p.detach().numpy().astype(np.float32) for p in params]
    if not all(np.isfinite(x).all() for x in values):
        return "the joint refinement produced non-finite weights"
    return FeatureMaps(*values[:4]), (1 / (1 + np.exp(-values[4].astype(np.float64)))).astype(np.float32)
