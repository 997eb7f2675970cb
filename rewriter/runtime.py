"""onnxruntime sessions: the one factory, so every session of the tool runs with the same settings."""

from __future__ import annotations

import os

import onnxruntime as ort


def session_options(threads: int | None = None, *, timing: bool = False) -> ort.SessionOptions:
    """The one place sessions are configured: `threads` intra-op (default all cores), 1 inter-op.

    `timing` pins what benchmarks need: sequential execution, every graph optimisation, and no
    spinning threads (with several sessions interleaved, the idle pool of the model that just ran
    would steal the cores of the next one)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # we report failures ourselves, in one sentence
    if timing:
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
    return opts


def cpu_session(model: str | bytes, threads: int | None = None, *, timing: bool = False) -> ort.InferenceSession:
    """A CPU session for a model file path or serialized bytes (errors are the caller's to word)."""
    return ort.InferenceSession(model, session_options(threads, timing=timing), providers=["CPUExecutionProvider"])
