"""Drift metrics between a reference and a test run, and accuracy budgets.

Definitions (all computed in float64, per output, over every calibration sample at once):

- `cosine`: cosine similarity of each sample (leading axis, flattened) averaged over samples, so
  one collapsed sample shows even when the others are fine; `cosine_min` is the worst sample and
  `cosine_global` the cosine of the whole flattened tensor. A sample that is zero in both runs
  counts as 1; zero in only one run counts as 0. A rank-0/1 output is a single sample.
- `rel_l2`: ‖ref − test‖ / ‖ref‖ over the whole tensor (0 when both are zero, inf when only ref is).
- `max_abs`: max |ref − test|.
- `snr_db`: 10·log10(‖ref‖² / ‖ref − test‖²), clipped to ±`SNR_CAP_DB` so identical outputs give a
  finite number that JSON can carry.
- `top1`: fraction of positions whose argmax over the last axis agrees; only for logits-like
  outputs (float, rank ≥ 2, last dim in 2..100000), absent otherwise.

Non-finite values: positions where both runs hold the same inf (or both NaN) are equal and left out
of the sums; any other non-finite value in either run makes the output maximally bad (cosine NaN,
rel_l2/max_abs inf, snr -cap, top1 0) and `nonfinite` counts the offending positions. Budgets
never hold on NaN. Bool and integer outputs are compared as numbers; other dtypes (strings) only
report `mismatch`, the count of differing elements.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Mapping, Sequence

import numpy as np

from attnrewrite.errors import AttnRewriteError, InputError

SNR_CAP_DB = 200.0
#: Metrics a budget may name.
METRICS = ("cosine", "cosine_min", "cosine_global", "rel_l2", "max_abs", "snr_db", "top1")
#: Direction used when a budget is written without an operator (`cosine=0.999`).
HIGHER_IS_BETTER = {"cosine": True, "cosine_min": True, "cosine_global": True, "snr_db": True, "top1": True,
                    "rel_l2": False, "max_abs": False}
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_TOP1_MAX_CLASSES = 100_000

Outputs = Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]]


# --------------------------------------------------------------------------- batches


def concat_batches(batches: Outputs) -> dict[str, np.ndarray]:
    """A list of per-batch output dicts → one dict, concatenated on axis 0 (rank-0 outputs stacked).

    A plain dict is returned as is, so callers can pass either form.
    """
    if isinstance(batches, Mapping):
        return {k: np.asarray(v) for k, v in batches.items()}
    batches = list(batches)
    if not batches:
        return {}
    names = list(batches[0])
    for i, b in enumerate(batches[1:], 1):
        if list(b) != names and set(b) != set(names):
            raise AttnRewriteError(f"batch {i} has outputs {sorted(b)} but batch 0 has {sorted(names)}.")
    out = {}
    for name in names:
        parts = [np.asarray(b[name]) for b in batches]
        if len(parts) == 1:
            out[name] = parts[0]
        elif all(p.ndim >= 1 for p in parts):
            if len({p.shape[1:] for p in parts}) > 1:
                raise AttnRewriteError(f"output {name!r} changes shape across batches ({sorted({p.shape for p in parts})}).")
            out[name] = np.concatenate(parts, axis=0)
        else:
            out[name] = np.stack(parts)
    return out


# --------------------------------------------------------------------------- single metrics


def _as_samples(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of 2-D float64 arrays; zero in both → 1, zero in one → 0."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), dot / np.maximum(na * nb, np.finfo(np.float64).tiny), 0.0)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    return np.clip(cos, -1.0, 1.0)


def cosine_per_sample(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Cosine of each sample (leading axis), as an array of length N."""
    return _cosines(_as_samples(np.asarray(ref, np.float64)), _as_samples(np.asarray(test, np.float64)))


def rel_l2(ref: np.ndarray, test: np.ndarray) -> float:
    a, b = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    denom = float(np.linalg.norm(a.ravel()))
    diff = float(np.linalg.norm((a - b).ravel()))
    if denom > 0:
        return diff / denom
    return 0.0 if diff == 0 else math.inf


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    a, b = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    noise = float(np.sum((a - b) ** 2))
    signal = float(np.sum(a**2))
    if noise == 0:
        return SNR_CAP_DB
    if signal == 0:
        return -SNR_CAP_DB
    return float(np.clip(10.0 * math.log10(signal / noise), -SNR_CAP_DB, SNR_CAP_DB))


def is_logits_like(array: np.ndarray) -> bool:
    return (np.issubdtype(array.dtype, np.floating) and array.ndim >= 2
            and 2 <= array.shape[-1] <= _TOP1_MAX_CLASSES)


def top1_agreement(ref: np.ndarray, test: np.ndarray) -> float:
    """Fraction of positions (all axes but the last) whose argmax over the last axis agrees."""
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(test, axis=-1)))


def _real(x: np.ndarray) -> bool:
    return x.dtype == np.bool_ or (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating))


def compare(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Every metric for one output (see the module docstring for definitions)."""
    ref, test = np.asarray(ref), np.asarray(test)
    if ref.shape != test.shape:
        raise AttnRewriteError(f"output shapes differ between the runs: {ref.shape} vs {test.shape}.")
    if not (_real(ref) and _real(test)):
        return {"mismatch": float(np.sum(ref != test))}
    a, b = ref.astype(np.float64), test.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    same_special = ~finite & ((a == b) | (np.isnan(a) & np.isnan(b)))
    bad = int(np.sum(~finite & ~same_special))
    logits = is_logits_like(ref)
    if bad:
        out = {"cosine": math.nan, "cosine_min": math.nan, "cosine_global": math.nan, "rel_l2": math.inf,
               "max_abs": math.inf, "snr_db": -SNR_CAP_DB, "nonfinite": float(bad)}
        if logits:
            out["top1"] = 0.0
        return out
    if not finite.all():
        a, b = np.where(finite, a, 0.0), np.where(finite, b, 0.0)
    cos = cosine_per_sample(a, b)
    out = {
        "cosine": float(np.mean(cos)) if cos.size else 1.0,
        "cosine_min": float(np.min(cos)) if cos.size else 1.0,
        "cosine_global": float(_cosines(a.reshape(1, -1), b.reshape(1, -1))[0]),
        "rel_l2": rel_l2(a, b),
        "max_abs": float(np.max(np.abs(a - b))) if a.size else 0.0,
        "snr_db": snr_db(a, b),
        "nonfinite": 0.0,
    }
    if logits:
        out["top1"] = top1_agreement(ref, test)
    return out


def compare_outputs(ref: Outputs, test: Outputs) -> dict[str, dict[str, float]]:
    """Metrics per output name of `ref`; each dict may also be a list of per-batch dicts."""
    ref, test = concat_batches(ref), concat_batches(test)
    missing = [n for n in ref if n not in test]
    if missing:
        raise AttnRewriteError(f"the test run lacks outputs {missing} of the reference run.")
    return {name: compare(ref[name], test[name]) for name in ref}


def site_metrics(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Cosine (per-sample mean), rel-L2 and max-abs of one intermediate tensor."""
    m = compare(ref, test)
    return {k: m[k] for k in ("cosine", "rel_l2", "max_abs") if k in m}


# --------------------------------------------------------------------------- budgets


@dataclasses.dataclass(frozen=True)
class Budget:
    metric: str
    op: str
    threshold: float
    #: the one output the budget applies to; None = every output that reports the metric
    output: str | None = None

    def __str__(self) -> str:
        scope = f"{self.output}:" if self.output else ""
        return f"{scope}{self.metric}{self.op}{self.threshold:.15g}"  # never rounds 0.9999999 to 1

    def holds(self, value: float) -> bool:
        return not math.isnan(value) and bool(_OPS[self.op](value, self.threshold))

    def worse(self, a: float, b: float) -> bool:
        """True when value `a` is further from passing than `b` (NaN is the worst)."""
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and not math.isnan(b)
        return a < b if self.op in (">=", ">") else a > b


@dataclasses.dataclass(frozen=True)
class BudgetFailure:
    budget: Budget
    output: str | None
    value: float | None
    message: str

    def __str__(self) -> str:
        return self.message


def parse_budget(text: str) -> Budget:
    """`"cosine>=0.999"`, `"rel_l2<0.01"`; `"metric=X"` (or `metric:X`) uses the metric's natural direction.

    `"OUTPUT:cosine>=0.99"` scopes the budget to one output: a text encoder's pooled embedding is what
    users compare, while its per-token states at padded positions may move without consequence.
    """
    m = re.fullmatch(r"\s*(?:(.+):)?([A-Za-z_0-9]+)\s*(>=|<=|>|<|==|=|:)\s*(\S+?)\s*", text or "")
    if m and m.group(1) and m.group(2).lower() not in METRICS:  # `cosine:0.99`, not an output scope
        m = None
    if not m:
        m = re.fullmatch(r"\s*()([A-Za-z_0-9]+)\s*(>=|<=|>|<|==|=|:)\s*(\S+?)\s*", text or "")
    if not m:
        raise InputError(f"cannot read budget {text!r}; write [OUTPUT:]METRIC>=X or METRIC<=X with METRIC one of "
                         f"{', '.join(METRICS)}.")
    output, metric, op, raw = m.group(1) or None, m.group(2).lower(), m.group(3), m.group(4)
    if metric not in METRICS:
        raise InputError(f"unknown budget metric {metric!r}; valid metrics: {', '.join(METRICS)}.")
    if op in ("=", "==", ":"):
        op = ">=" if HIGHER_IS_BETTER[metric] else "<="
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"budget {text!r}: {raw!r} is not a number.") from None
    if math.isnan(value):
        raise InputError(f"budget {text!r} has a NaN threshold, which no value can meet.")
    return Budget(metric, op, value, output)


def check_output_names(budgets: Sequence[Budget], outputs: Sequence[str]) -> None:
    """A budget scoped to an output the model does not have is a usage error, not a silent pass."""
    for budget in budgets:
        if budget.output is not None and budget.output not in outputs:
            raise InputError(f"budget {budget} names output {budget.output!r}, but the model's outputs are "
                             f"{', '.join(map(repr, outputs))}.")


def worst_output(budget: Budget, metrics_per_output: Mapping[str, Mapping[str, float]]) -> tuple[str, float] | None:
    """(output, value) of the budget's metric on the output furthest from passing; None when no
    output in the budget's scope reports the metric."""
    rows = [(name, float(m[budget.metric])) for name, m in metrics_per_output.items()
            if budget.metric in m and budget.output in (None, name)]
    if not rows:
        return None
    name, value = rows[0]
    for n, v in rows[1:]:
        if budget.worse(v, value):
            name, value = n, v
    return name, value


def check_budgets(budgets: Sequence[Budget], metrics_per_output: Mapping[str, Mapping[str, float]]) -> list[BudgetFailure]:
    """One failure per budget that does not hold; the worst output for the budget's metric decides.

    A budget applies to every output that reports its metric (top1 exists only for logits-like
    outputs); if no output reports it, that is a failure, not a silent pass. Every message starts
    with `str(budget)`.
    """
    failures = []
    for budget in budgets:
        worst = worst_output(budget, metrics_per_output)
        if worst is None:
            why = " (top1 needs a float output of rank >= 2 with 2..100000 classes on the last axis)" if budget.metric == "top1" else ""
            which = f"output {budget.output!r} does not have" if budget.output else "no output has"
            failures.append(BudgetFailure(budget, None, None, f"{budget}: {which} metric {budget.metric}{why}"))
            continue
        name, value = worst
        if not budget.holds(value):
            failures.append(BudgetFailure(budget, name, value, f"{budget}: output {name!r} has {budget.metric}={value:.6g}"))
    return failures
