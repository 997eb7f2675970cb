"""Shared test plumbing: cached ONNX exports of the model fixtures, and onnxruntime helpers.

Tests that use the `export`/`exported` fixtures are marked `slow` automatically (a cold cache exports
with torch; `pytest -m "not slow"` skips them). Exports land in `<repo>/.cache/exports/` and are reused
across runs and pytest-xdist workers; see `tests/fixtures/export.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

_EXPORT_FIXTURES = {"export", "exported"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _EXPORT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _get(name: str, exporter: str):
    pytest.importorskip("torch", reason="exporting fixtures needs torch (pip install -e '.[torch]')")
    from tests.fixtures import ExportUnsupported, get

    try:
        return get(name, exporter)
    except ExportUnsupported as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def export() -> Callable[[str, str], Path]:
    """`export(name, exporter) -> Path` of the cached ONNX file; skips (with the reason) if unsupported."""
    return lambda name, exporter: _get(name, exporter).path


@pytest.fixture(scope="session")
def exported():
    """`exported(name, exporter) -> Export`: path, metadata (`.meta.sites`) and `.reference()` feeds/outputs."""
    return _get


def ort_session(path: str | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # two xdist workers on two cores
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_run(path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a model on CPU; returns every output by name."""
    sess = ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def relative_max_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / max|ref|: one number that is comparable across outputs of different scale."""
    return float(np.abs(got.astype(np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-12))
