"""Side-by-side CPU latency of ONNX models, in one process, with interleaved repeats.

Timing models in separate runs compares machine states as much as models (frequency scaling,
other tenants, cache warmth). Here every session is created first with the same pinned thread
settings, each is warmed up, and then repeats go A, B, C, A, B, C, ... so that noise lands on all
models alike. Reported numbers are order statistics of per-run wall time (median, p10, p90, min);
`ratio_vs_first` is first.median / this.median, i.e. the speed-up over the first model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from attnrewrite.errors import AttnRewriteError, InputError, ort_message
from attnrewrite.ir.dtypes import numpy_dtype_of_ort
from attnrewrite.validate import calib
from attnrewrite.runtime import cpu_session

ModelRef = str | os.PathLike | bytes | onnx.ModelProto
@dataclasses.dataclass
class BenchResult:
    """Latency of one model; times in milliseconds, `times_ms` in run order."""

    path: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    ratio_vs_first: float
    runs: int
    threads: int
    times_ms: list[float] = dataclasses.field(default_factory=list)


def _label(model: ModelRef, index: int) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return f"<model {index}>"


def make_session(model: ModelRef, threads: int | None = None, index: int = 0) -> ort.InferenceSession:
    """A CPU session with `session_options(threads, timing=True)`; missing files are InputError, ORT refusals AttnRewriteError."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    if isinstance(model, (str, os.PathLike)) and not Path(model).is_file():
        raise InputError(f"model file {model} does not exist.")
    try:
        return cpu_session(model, threads, timing=True)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        last = ort_message(exc)
        raise AttnRewriteError(f"onnxruntime cannot load {_label(model, index)}: {last}") from exc


def _feeds_for(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise InputError(f"{label} needs inputs {missing} that the benchmark feeds do not have.")
    return {n: feeds[n] for n in names}


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray], label: str) -> float:
    """One timed run in milliseconds."""
    start = time.perf_counter_ns()
    try:
        session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        last = ort_message(exc)
        raise AttnRewriteError(f"onnxruntime failed while running {label}: {last}") from exc
    return (time.perf_counter_ns() - start) / 1e6


def bench_models(
    paths: Sequence[ModelRef],
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
    interleave: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[BenchResult]:
    """Time every model on the same `feeds` in this process; results in the order of `paths`.

    Each model gets only the feeds its session declares. `progress(step, total)` is called after
    every run, warm-up included: total = (warmup + repeats) * len(paths).
    With `interleave=False` each model runs all its repeats in a row (useful to see how much the
    interleaving matters, not for comparisons).
    """
    if not paths:
        raise InputError("bench needs at least one model.")
    if repeats < 1 or warmup < 0:
        raise InputError(f"bench needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}.")
    n_threads = int(threads or os.cpu_count() or 1)
    labels = [_label(p, i) for i, p in enumerate(paths)]
    sessions = [make_session(p, n_threads, i) for i, p in enumerate(paths)]
    model_feeds = [_feeds_for(s, feeds, label) for s, label in zip(sessions, labels)]
    total = (warmup + repeats) * len(sessions)
    step = 0

    def tick() -> None:
        nonlocal step
        step += 1
        if progress:
            progress(step, total)

    for s, f, label in zip(sessions, model_feeds, labels):
        for _ in range(warmup):
            _run(s, f, label)
            tick()
    times: list[list[float]] = [[] for _ in sessions]
    if interleave:
        for _ in range(repeats):
            for i, (s, f, label) in enumerate(zip(sessions, model_feeds, labels)):
                times[i].append(_run(s, f, label))
                tick()
    else:
        for i, (s, f, label) in enumerate(zip(sessions, model_feeds, labels)):
            for _ in range(repeats):
                times[i].append(_run(s, f, label))
                tick()
    first_median = float(np.median(times[0]))
    results = []
    for label, t in zip(labels, times):
        arr = np.asarray(t)
        median = float(np.median(arr))
        results.append(BenchResult(
            path=label, median_ms=median, p10_ms=float(np.percentile(arr, 10)), p90_ms=float(np.percentile(arr, 90)),
            min_ms=float(arr.min()), ratio_vs_first=first_median / median if median > 0 else float("inf"),
            runs=len(t), threads=n_threads, times_ms=[float(x) for x in t],
        ))
    return results


def random_feeds(
    session_or_path: ort.InferenceSession | ModelRef,
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    *,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One batch of seeded random inputs for a model, built by `calib` (same shape rules and value ranges).

    From a path or proto the graph is read, so token-id ranges follow the embedding table; from a
    session only names, dtypes and shapes are known.
    """
    if isinstance(session_or_path, ort.InferenceSession):
        specs = [_spec_from_ort(i) for i in session_or_path.get_inputs()]
    elif isinstance(session_or_path, bytes):
        specs = calib.input_specs(onnx.load_from_string(session_or_path))
    else:
        specs = calib.input_specs(session_or_path)
    shapes = calib.resolve_shapes(specs, dict(overrides or {}))
    batch = shapes[specs[0].name][0] if specs and shapes[specs[0].name] else 1
    return calib.load_calibration(None, specs, shapes, num_samples=max(1, batch), seed=seed).batches[0]


def _spec_from_ort(arg) -> calib.InputSpec:
    dtype = numpy_dtype_of_ort(arg.type)
    if dtype is None:
        raise InputError(f"input {arg.name!r} has type {arg.type}, which attnrewrite cannot feed.")
    return calib.InputSpec(arg.name, dtype, tuple(arg.shape))


def matmul_model(m: int, n: int, k: int, batch: int = 1) -> onnx.ModelProto:
    """[batch, m, k] · [batch, k, n] with both operands as inputs, so ORT cannot pre-pack or fold them."""
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [batch, m, k])
    b = helper.make_tensor_value_info("B", TensorProto.FLOAT, [batch, k, n])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, m, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "matmul", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def matmul_gflops(
    m: int, n: int, k: int, threads: int | None = None, *, batch: int = 1, warmup: int = 3, repeats: int = 20, seed: int = 0
) -> float:
    """GFLOP/s (2·batch·m·n·k per run, median run time) of a plain ORT MatMul in this process.

    Gives the throughput an ideal kernel of this shape reaches with the same thread settings as
    `bench_models`, for judging how close a rewritten site runs to dense-GEMM speed.
    """
    if min(m, n, k, batch) < 1:
        raise InputError(f"matmul sizes must be positive, got m={m}, n={n}, k={k}, batch={batch}.")
    rng = np.random.default_rng(seed)
    feeds = {"A": rng.standard_normal((batch, m, k), dtype=np.float32),
             "B": rng.standard_normal((batch, k, n), dtype=np.float32)}
    result = bench_models([matmul_model(m, n, k, batch)], feeds, warmup=warmup, repeats=repeats, threads=threads)[0]
    return 2.0 * batch * m * n * k / (result.median_ms * 1e-3) / 1e9
