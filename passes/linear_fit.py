"""Fitted feature maps for `linear:phi=fitted` (Hedgehog's form, LoLCATs' attention transfer).

Per head, separate maps for queries and keys, φ(x) = [softmax(xW + b), softmax(−xW − b)] over the
feature axis (2·dim features, ALGORITHMS.md §6), fitted on the site's own calibration activations
(teacher Q, K, V and softmax output), so every site fits independently and the model never runs in a
training loop. `objective=attn` minimises KL(softmax weights ‖ linear weights) on sampled query rows
(Hedgehog); `objective=output` the MSE between linear and softmax outputs (LoLCATs). The last quarter of
the calibration samples is held out: the report shows weight KL and output cosine there, before (elu+1)
and after fitting, so overfitting is visible.

Fitting uses torch (Adam) when it is installed; without torch the pass says so in one sentence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnrewrite.errors import InputError

#: query rows sampled for fitting and the held-out report (memory: rows × keys per sample and head)
MAX_QUERY_ROWS = 256


@dataclasses.dataclass(frozen=True)
class FeatureMaps:
    """Per-head maps, float32: `wq`, `wk` [h, d, m]; `bq`, `bk` [h, 1, m]."""

    wq: np.ndarray
    bq: np.ndarray
    wk: np.ndarray
    bk: np.ndarray


def hedgehog_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[softmax(xW+b), softmax(−xW−b)] over features, x [B, h, N, d] → [B, h, N, 2m], in float64."""
    z = x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
    return np.concatenate([_softmax(z), _softmax(-z)], axis=-1)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def split(samples: int) -> tuple[slice, slice]:
    """(fit, held-out) sample ranges: the last quarter held out, at least one sample each when ≥ 2."""
    if samples < 2:
        return slice(0, samples), slice(0, samples)
    held = max(1, samples // 4)
    return slice(0, samples - held), slice(samples - held, samples)


@dataclasses.dataclass(frozen=True)
class FitResult:
    maps: FeatureMaps | None
    backend: str
    #: per head, on the held-out samples: before (elu+1) and after fitting
    kl_before: list[float]
    kl_after: list[float]
    cosine_before: list[float]
    cosine_after: list[float]
    #: why the fit was abandoned (non-finite loss or weights); None when it succeeded
    failure: str | None = None


def fit_feature_maps(q, k, v, target, *, scale: float, dim: int, steps: int, objective: str, seed: int,
                     prefix: int = 0, key_weight: np.ndarray | None = None, lr: float = 1e-2) -> FitResult:
    """Fit per-head maps on the first samples of `q, k, v, target` ([S, h, N, d]); report on the rest."""
    try:
        import torch
    except ImportError:
        raise InputError("linear:phi=fitted fits with torch, which is not installed (pip install 'attnrewrite[torch]').") from None
    samples, heads, n, d = q.shape
    if samples * (n - prefix) < 2 * dim:
        raise InputError(f"phi=fitted with dim={dim} needs at least {2 * dim} calibration query rows per head; "
                         f"this site has {samples * (n - prefix)} ({samples} samples × {n - prefix} tokens): give more "
                         "--calib samples or a smaller dim.")
    fit_part, held = split(samples)
    gen = torch.Generator().manual_seed(seed)
    t = {name: torch.as_tensor(np.asarray(x, np.float32)) for name, x in (("q", q), ("k", k), ("v", v), ("y", target))}
    weight = torch.as_tensor(np.asarray(key_weight, np.float32)) if key_weight is not None else None
    root = scale ** 0.5
    params = [torch.randn(heads, d, dim, generator=gen) * root, torch.zeros(heads, 1, dim),
              torch.randn(heads, d, dim, generator=gen) * root, torch.zeros(heads, 1, dim)]
    for p in params:
        p.requires_grad_(True)
    rows = torch.randperm(n - prefix, generator=gen)[:MAX_QUERY_ROWS] + prefix
    optimiser = torch.optim.Adam(params, lr=lr)

    def features(x, w, b):
        z = x @ w + b
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)

    def key_weight_of(part):
        """The per-key weights of these samples (a bias shared by every sample broadcasts)."""
        return weight if weight is None or weight.shape[0] != samples else weight[part]

    def weights_and_output(part, query_rows, phi_q, phi_k):
        """Normalised linear weights and output of the given feature maps on these samples and rows."""
        fq, fk = phi_q(t["q"][part][:, :, query_rows]), phi_k(t["k"][part])
        if weight is not None:
            fk = fk * key_weight_of(part)
        a = fq @ fk.transpose(-1, -2)
        a = a / (a.sum(-1, keepdim=True) + 1e-6)
        return a, a @ t["v"][part]

    def fitted_q(x):
        return features(x, params[0], params[1])

    def fitted_k(x):
        return features(x, params[2], params[3])

    def elu1(x):
        return torch.nn.functional.elu(x * root) + 1

    def teacher(part, query_rows):
        logits = scale * t["q"][part][:, :, query_rows] @ t["k"][part].transpose(-1, -2)
        if weight is not None:
            logits = logits + torch.log(key_weight_of(part).transpose(-1, -2).clamp_min(1e-30))
        return torch.softmax(logits, -1)

    soft_fit = teacher(fit_part, rows)
    for _ in range(steps):
        optimiser.zero_grad()
        a, out = weights_and_output(fit_part, rows, fitted_q, fitted_k)
        if objective == "attn":
            loss = (soft_fit * (torch.log(soft_fit + 1e-12) - torch.log(a + 1e-12))).sum(-1).mean()
        else:
            loss = ((out - t["y"][fit_part][:, :, rows]) ** 2).mean()
        if not torch.isfinite(loss):
            return FitResult(None, "torch", [], [], [], [], failure="the fit diverged (non-finite loss)")
        loss.backward()
        optimiser.step()
    maps = FeatureMaps(*(p.detach().numpy().astype(np.float32) for p in params))
    if not all(np.isfinite(x).all() for x in dataclasses.astuple(maps)):
        return FitResult(None, "torch", [], [], [], [], failure="the fit produced non-finite weights")
    with torch.no_grad():  # held-out samples, the same sampled query rows (bounded memory at 4k tokens)
        soft = teacher(held, rows)
        y = t["y"][held][:, :, rows]
        a_after, o_after = weights_and_output(held, rows, fitted_q, fitted_k)
        a_before, o_before = weights_and_output(held, rows, elu1, elu1)
        return FitResult(maps, "torch", _kl(soft, a_before), _kl(soft, a_after), _cos(y, o_before), _cos(y, o_after))


def _kl(p, q) -> list[float]:
    import torch

    per = (p * (torch.log(p + 1e-12) - torch.log(q + 1e-12))).sum(-1)  # [S, h, rows]
    return [round(float(x), 4) for x in per.mean(dim=(0, 2))]


def _cos(a, b) -> list[float]:
    import torch

    per_head = lambda x: x.transpose(1, 0).reshape(x.shape[1], -1)  # noqa: E731  [h, everything else]
    cos = torch.nn.functional.cosine_similarity(per_head(a), per_head(b), dim=-1)
    return [round(float(x), 4) for x in cos]
