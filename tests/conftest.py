"""Shared test plumbing: cached ONNX exports of the model fixtures, and the one onnxruntime helper
(`ort_run`, `ort_session`) every test runs models with.

Tests that use the `export`/`exported` fixtures are marked `slow` automatically (a cold cache exports
with torch; `pytest -m "not slow"` skips them). Exports land in `<repo>/.cache/exports/` and are reused
across runs and pytest-xdist workers; see `tests/fixtures/export.py`.
"""

from __future__ import annotations

import os

# Triton decides interpreted vs compiled once, at import (plugins/loader.py): the kernel tests run on
# CPU tensors in the interpreter, so choose it before anything imports triton. Ahead-of-time
# compilation runs in subprocesses without it.
os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

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


def _as_proto(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, ir.Model):
        return ir.to_proto(model)
    return onnx.load(str(model))  # external data read relative to the file


def _with_outputs(proto: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of `proto` that also returns the internal values `names` (element types from shape inference)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    present = {o.name for o in copy.graph.output}
    missing = [n for n in names if n not in present]
    if missing:
        inferred = onnx.shape_inference.infer_shapes(copy)
        types = {vi.name: vi.type.tensor_type.elem_type
                 for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
        for name in missing:
            copy.graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    return copy


def ort_session(model, outputs: Iterable[str] = ()):
    """A one-thread CPU session (two xdist workers on two cores) for a path, an `onnx.ModelProto` or an
    `ir.Model`; `outputs` names internal values to expose as extra outputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # no constant-folding warnings in test output
    outputs = list(outputs)
    if isinstance(model, (str, os.PathLike)) and not outputs:
        source = str(model)  # external data resolves next to the file
    else:
        proto = _as_proto(model)
        if outputs:
            proto = _with_outputs(proto, outputs)
        source = proto.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ort_run(model, feeds: dict[str, np.ndarray], outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Run a model on CPU: `model` is a path, `onnx.ModelProto`, `ir.Model` or a session from `ort_session`.

    Returns every graph output by name, or only `outputs` (which may name internal values)."""
    import onnxruntime as ort

    names = list(outputs) if outputs is not None else None
    sess = model if isinstance(model, ort.InferenceSession) else ort_session(model, names or ())
    names = names or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def relative_max_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / max|ref|: one number that is comparable across outputs of different scale."""
    return float(np.abs(got.astype(np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-12))


@pytest.fixture(scope="session")
def vit32(tmp_path_factory) -> tuple[Path, Path]:
    """(model, calib.npz): the torch-free synthetic ViT at 32×32 (8×8 grid + CLS, 2 layers, 2 heads) and
    8 seeded calibration images; shared by the tests of plugin targets and fitted linear maps."""
    from attnrewrite.synthetic import vit

    folder = tmp_path_factory.mktemp("vit32")
    path = folder / "vit.onnx"
    onnx.save(vit(depth=2, img=(32, 32), patch=4, dim=32, heads=2), path)
    calib = folder / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    return path, calib
