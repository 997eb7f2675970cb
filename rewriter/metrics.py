"""Drift metrics between a reference and a test run, and accuracy budgets.

Cosine is computed per sample (the leading axis) and averaged, because one collapsed sample should
show even when the others are fine; rel-L2, max-abs and SNR are over the whole tensor. SNR is capped
at `SNR_CAP_DB` so identical outputs give a finite number JSON can carry. Top-1 agreement is reported
only for logits-like outputs (float, rank ≥ 2, a class axis of 2..100000).
"""

from __future__ import annotations

import dataclasses
import operator
import re

import numpy as np

from attnrewrite.errors import InputError

SNR_CAP_DB = 200.0
METRICS = ("cosine", "rel_l2", "max_abs", "snr_db", "top1")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def cosine_per_sample(ref: np.ndarray, test: np.ndarray) -> float:
    a = ref.reshape(ref.shape[0], -1).astype(np.float64) if ref.ndim > 1 else ref.reshape(1, -1).astype(np.float64)
    b = test.reshape(a.shape).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-300))
    return float(np.mean(cos))


def rel_l2(ref: np.ndarray, test: np.ndarray) -> float:
    a, b = ref.astype(np.float64), test.astype(np.float64)
    denom = np.linalg.norm(a)
    diff = np.linalg.norm(a - b)
    return float(diff / denom) if denom > 0 else (0.0 if diff == 0 else float("inf"))


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    a, b = ref.astype(np.float64), test.astype(np.float64)
    noise = float(np.sum((a - b) ** 2))
    signal = float(np.sum(a**2))
    if noise == 0:
        return SNR_CAP_DB
    if signal == 0:
        return -SNR_CAP_DB
    return float(min(SNR_CAP_DB, 10.0 * np.log10(signal / noise)))


def is_logits_like(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) and array.ndim >= 2 and 2 <= array.shape[-1] <= 100_000


def compare(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Every metric for one output; NaN/inf in the test output is reported, not hidden."""
    ref, test = np.asarray(ref), np.asarray(test)
    if ref.shape != test.shape:
        raise InputError(f"output shapes differ: {ref.shape} vs {test.shape}.")
    if not np.issubdtype(ref.dtype, np.number) or not np.issubdtype(test.dtype, np.number):
        return {"max_abs": float(np.sum(ref != test))}
    if not np.all(np.isfinite(test)):
        return {"cosine": float("nan"), "rel_l2": float("inf"), "max_abs": float("inf"), "snr_db": -SNR_CAP_DB,
                **({"top1": 0.0} if is_logits_like(ref) else {})}
    out = {
        "cosine": cosine_per_sample(ref, test),
        "rel_l2": rel_l2(ref, test),
        "max_abs": float(np.max(np.abs(ref.astype(np.float64) - test.astype(np.float64)))) if ref.size else 0.0,
        "snr_db": snr_db(ref, test),
    }
    if is_logits_like(ref):
        out["top1"] = float(np.mean(np.argmax(ref, axis=-1) == np.argmax(test, axis=-1)))
    return out


def compare_outputs(ref: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Metrics per output name present in `ref` (each must be in `test`)."""
    return {name: compare(ref[name], test[name]) for name in ref}


def site_metrics(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    m = compare(ref, test)
    return {k: m[k] for k in ("cosine", "rel_l2", "max_abs") if k in m}


@dataclasses.dataclass(frozen=True)
class Budget:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        return bool(_OPS[self.op](value, self.threshold)) if value == value else False  # NaN never holds


@dataclasses.dataclass(frozen=True)
class BudgetFailure:
    budget: Budget
    output: str | None
    value: float | None
    message: str

    def __str__(self) -> str:
        return self.message


def parse_budget(text: str) -> Budget:
    m = re.fullmatch(r"\s*([a-z_0-9]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+|inf)\s*", text)
    if not m:
        raise InputError(f"cannot read budget {text!r}; write METRIC>=X with METRIC one of {', '.join(METRICS)}.")
    metric, op, raw = m.groups()
    if metric not in METRICS:
        raise InputError(f"unknown budget metric {metric!r}; valid metrics: {', '.join(METRICS)}.")
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"budget {text!r}: {raw!r} is not a number.") from None
    return Budget(metric, op, value)


def check_budgets(budgets: list[Budget], metrics: dict[str, dict[str, float]]) -> list[BudgetFailure]:
    """Every budget must hold on every output that has its metric; the worst output decides."""
    failures = []
    for budget in budgets:
        rows = [(name, m[budget.metric]) for name, m in metrics.items() if budget.metric in m]
        if not rows:
            failures.append(BudgetFailure(budget, None, None, f"{budget}: no output has metric {budget.metric}"))
            continue
        for name, value in rows:
            if not budget.holds(value):
                failures.append(BudgetFailure(budget, name, value, f"{budget}: {name} has {budget.metric}={value:.6g}"))
    return failures
