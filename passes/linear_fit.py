"""Fitted feature maps for `linear:phi=fitted` (Hedgehog's form, LoLCATs' attention transfer).

Per head, separate maps for queries and keys, φ(x) = [softmax(xW + b), softmax(−xW − b)] over the
feature axis (2·dim features, ALGORITHMS.md §6), fitted on the site's own calibration activations
(teacher Q, K, V and softmax output), so every site fits independently and the model never runs in a
training loop. `objective=attn` minimises KL(softmax weights ‖ linear weights) on sampled query rows
(Hedgehog); `objective=output` the MSE between linear and softmax outputs (LoLCATs). The last quarter of
the calibration samples is held out: the report shows weight KL and output cosine there, before (elu+1)
and after fitting, so overfitting is visible.

Two optimisers run the same Adam on the same loss from the same numpy initialisation: torch's autograd
when torch is installed, else a numpy one with the gradient written out (`loss_and_grads`, tested
against autograd). The report says which ran; everything else (initialisation, row sampling, the
held-out report) is numpy, so both backends report comparable numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnrewrite.errors import InputError

#: query rows sampled for fitting and the held-out report (memory: rows × keys per sample and head)
MAX_QUERY_ROWS = 256
#: Adam's constants, torch's defaults, so both backends take the same steps
BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
#: added to the linear normaliser and inside the KL's logarithms
NORM_EPS, LOG_EPS = 1e-6, 1e-12


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


def hedgehog_torch(x, w, b):
    """`hedgehog_reference` on torch tensors (differentiable): the fitters and the torch front-end's module."""
    import torch

    z = x @ w + b
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)


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


@dataclasses.dataclass(frozen=True)
class Problem:
    """One site's fitting data on the sampled query rows: `q` [S, h, R, d], `k`/`v` [S, h, N, ·],
    `y` the softmax output at those rows, `teacher` its weights [S, h, R, N], `weight` the per-key
    weights [S|1, h|1, N, 1] of a padding bias (or None)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    y: np.ndarray
    teacher: np.ndarray
    weight: np.ndarray | None
    objective: str


def make_problem(q, k, v, target, part: slice, rows: np.ndarray, *, scale: float, key_weight, objective: str,
                 samples: int) -> Problem:
    weight = None
    if key_weight is not None:
        weight = np.asarray(key_weight, np.float32)
        weight = weight[part] if weight.shape[0] == samples and samples > 1 else weight
    qr = np.asarray(q[part][:, :, rows], np.float32)
    kp = np.asarray(k[part], np.float32)
    with np.errstate(all="ignore"):  # overflowing activations surface as a non-finite loss, reported once
        logits = scale * qr @ np.swapaxes(kp, -1, -2)
        if weight is not None:
            logits = logits + np.log(np.maximum(np.swapaxes(weight, -1, -2), 1e-30))
        teacher = _softmax(logits).astype(np.float32)
    return Problem(qr, kp, np.asarray(v[part], np.float32), np.asarray(target[part][:, :, rows], np.float32),
                   teacher, weight, objective)


def fit_feature_maps(q, k, v, target, *, scale: float, dim: int, steps: int, objective: str, seed: int,
                     prefix: int = 0, key_weight: np.ndarray | None = None, lr: float = 1e-2,
                     backend: str = "auto") -> FitResult:
    """Fit per-head maps on the first samples of `q, k, v, target` ([S, h, N, d]); report on the rest.
    `backend`: auto (torch when installed, else numpy), torch or numpy."""
    samples, heads, n, d = q.shape
    if samples * (n - prefix) < 2 * dim:
        raise InputError(f"phi=fitted with dim={dim} needs at least {2 * dim} calibration query rows per head; "
                         f"this site has {samples * (n - prefix)} ({samples} samples × {n - prefix} tokens): give more "
                         "--calib samples or a smaller dim.")
    if backend == "auto":
        backend = "torch" if has_torch() else "numpy"
    fit_part, held = split(samples)
    rng = np.random.default_rng(seed)
    root = scale ** 0.5
    init = [(rng.standard_normal((heads, d, dim)) * root).astype(np.float32), np.zeros((heads, 1, dim), np.float32),
            (rng.standard_normal((heads, d, dim)) * root).astype(np.float32), np.zeros((heads, 1, dim), np.float32)]
    rows = rng.permutation(n - prefix)[:MAX_QUERY_ROWS] + prefix
    common = dict(scale=scale, key_weight=key_weight, objective=objective, samples=samples)
    problem = make_problem(q, k, v, target, fit_part, rows, **common)
    adam = adam_torch if backend == "torch" else adam_numpy
    params, failure = adam(problem, init, steps, lr)
    if failure is None and not all(np.isfinite(p).all() for p in params):
        failure = "the fit produced non-finite weights"
    if failure is not None:
        return FitResult(None, backend, [], [], [], [], failure=failure)
    maps = FeatureMaps(*params)
    # held-out samples, the same sampled query rows (bounded memory at 4k tokens)
    report = make_problem(q, k, v, target, held, rows, **common)
    a_after, o_after = weights_and_output(report, *(hedgehog_reference(x, w, b) for x, w, b in
                                                    ((report.q, maps.wq, maps.bq), (report.k, maps.wk, maps.bk))))
    a_before, o_before = weights_and_output(report, _elu1(report.q * root), _elu1(report.k * root))
    return FitResult(maps, backend, _kl(report.teacher, a_before), _kl(report.teacher, a_after),
                     head_cosine(report.y, o_before), head_cosine(report.y, o_after))


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _elu1(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def weights_and_output(problem: Problem, fq: np.ndarray, fk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised linear weights [S, h, R, N] and output of the feature maps' values `fq`, `fk`."""
    if problem.weight is not None:
        fk = fk * problem.weight
    a = fq @ np.swapaxes(fk, -1, -2)
    a = a / (a.sum(-1, keepdims=True) + NORM_EPS)
    return a, a @ problem.v


# --- numpy: the loss and its gradient, written out ------------------------------------------------


def _features(x, w, b):
    z = x @ w + b
    pos, neg = _softmax(z), _softmax(-z)
    return np.concatenate([pos, neg], -1), (pos, neg)


def _features_back(halves, grad):
    """∂/∂z of [softmax(z), softmax(−z)] applied to `grad` (the softmax Jacobian, twice)."""
    pos, neg = halves
    m = pos.shape[-1]
    gp, gn = grad[..., :m], grad[..., m:]
    return pos * (gp - (pos * gp).sum(-1, keepdims=True)) - neg * (gn - (neg * gn).sum(-1, keepdims=True))


def loss_and_grads(problem: Problem, params: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """The fitting loss (KL to the teacher weights, or output MSE) and ∂loss/∂(wq, bq, wk, bk)."""
    wq, bq, wk, bk = params
    fq, q_halves = _features(problem.q, wq, bq)
    fk, k_halves = _features(problem.k, wk, bk)
    fkw = fk if problem.weight is None else fk * problem.weight
    raw = fq @ np.swapaxes(fkw, -1, -2)
    norm = raw.sum(-1, keepdims=True) + NORM_EPS
    a = raw / norm
    if problem.objective == "attn":
        p = problem.teacher
        count = p.shape[0] * p.shape[1] * p.shape[2]
        loss = float((p * (np.log(p + LOG_EPS) - np.log(a + LOG_EPS))).sum() / count)
        grad_a = -p / (a + LOG_EPS) / count
    else:
        diff = a @ problem.v - problem.y
        loss = float((diff * diff).mean())
        grad_a = (2.0 / diff.size) * diff @ np.swapaxes(problem.v, -1, -2)
    grad_raw = (grad_a - (grad_a * a).sum(-1, keepdims=True)) / norm
    grad_fq = grad_raw @ fkw
    grad_fk = np.swapaxes(grad_raw, -1, -2) @ fq
    if problem.weight is not None:
        grad_fk = grad_fk * problem.weight
    grads = []
    for x, halves, g in ((problem.q, q_halves, grad_fq), (problem.k, k_halves, grad_fk)):
        dz = _features_back(halves, g)
        grads += [np.einsum("shnd,shnm->hdm", x, dz), dz.sum(axis=(0, 2))[:, None, :]]
    return loss, grads


def adam_numpy(problem: Problem, init: list[np.ndarray], steps: int, lr: float):
    """Adam (torch's update rule and defaults) on `loss_and_grads`; (params, failure or None)."""
    params = [p.copy() for p in init]
    first = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    (b1, b2) = BETAS
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for step in range(1, steps + 1):
            loss, grads = loss_and_grads(problem, params)
            if not np.isfinite(loss):
                return params, "the fit diverged (non-finite loss)"
            for p, g, m1, m2 in zip(params, grads, first, second):
                m1 *= b1
                m1 += (1 - b1) * g
                m2 *= b2
                m2 += (1 - b2) * g * g
                p -= lr * (m1 / (1 - b1 ** step)) / (np.sqrt(m2 / (1 - b2 ** step)) + ADAM_EPS)
    return [p.astype(np.float32) for p in params], None


# --- torch: the same loss through autograd --------------------------------------------------------


def torch_loss(problem: Problem, params, torch):
    """`loss_and_grads`' loss in torch (autograd differentiates it)."""
    t = {name: torch.as_tensor(getattr(problem, name)) for name in ("q", "k", "v", "y", "teacher")}

    fq, fk = hedgehog_torch(t["q"], params[0], params[1]), hedgehog_torch(t["k"], params[2], params[3])
    if problem.weight is not None:
        fk = fk * torch.as_tensor(problem.weight)
    a = fq @ fk.transpose(-1, -2)
    a = a / (a.sum(-1, keepdim=True) + NORM_EPS)
    if problem.objective == "attn":
        p = t["teacher"]
        return (p * (torch.log(p + LOG_EPS) - torch.log(a + LOG_EPS))).sum(-1).mean()
    return ((a @ t["v"] - t["y"]) ** 2).mean()


def adam_torch(problem: Problem, init: list[np.ndarray], steps: int, lr: float):
    import torch

    params = [torch.tensor(p, requires_grad=True) for p in init]
    optimiser = torch.optim.Adam(params, lr=lr, betas=BETAS, eps=ADAM_EPS)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = torch_loss(problem, params, torch)
        if not torch.isfinite(loss):
            return init, "the fit diverged (non-finite loss)"
        loss.backward()
        optimiser.step()
    return [p.detach().numpy().astype(np.float32) for p in params], None


# --- the held-out report ------------------------------------------------------------------------


def _kl(p: np.ndarray, q: np.ndarray) -> list[float]:
    per = (p * (np.log(p + LOG_EPS) - np.log(q + LOG_EPS))).sum(-1)  # [S, h, rows]
    return [round(float(x), 4) for x in per.mean(axis=(0, 2))]


def head_cosine(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Output cosine per head of two [S, h, N, d] arrays, rounded for the report."""
    per_head = lambda x: np.swapaxes(x, 0, 1).reshape(x.shape[1], -1).astype(np.float64)  # noqa: E731
    a, b = per_head(a), per_head(b)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return [round(float(x), 4) for x in cos]
