"""Run models in onnxruntime over calibration batches, optionally exposing internal values.

Validation needs internal tensors (each site's attention output) from models we must not change.
We add them as extra graph outputs on a serialized *copy*. A copy whose weights live in external
files is written beside the original model so the relative data locations still resolve: no
gigabytes of weights are rewritten just to validate.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from attnrewrite.errors import AttnRewriteError, InputError, ort_message
from attnrewrite.runtime import cpu_session


def proto_with_outputs(proto: onnx.ModelProto, extra: Iterable[str]) -> onnx.ModelProto:
    """A copy of `proto` that also outputs the named internal values."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    extra = list(extra)
    present = {o.name for o in copy.graph.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in copy.graph.value_info}
    if any(name not in types and name not in present for name in extra):
        try:
            inferred = onnx.shape_inference.infer_shapes(copy)
            types.update({vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info})
        except Exception:  # noqa: BLE001 - float is the right guess for attention outputs
            pass
    for name in extra:
        if name not in present:
            copy.graph.output.append(
                onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
            )
            present.add(name)
    return copy


def make_session(model: ir.Model | onnx.ModelProto, base_dir: Path | None, extra_outputs: Iterable[str] = ()) -> ort.InferenceSession:
    """An onnxruntime session for an in-memory model whose external data (if any) lives in base_dir."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    proto = proto_with_outputs(proto, extra_outputs)
    has_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    try:
        if not has_external or base_dir is None:
            return cpu_session(proto.SerializeToString())
        fd, tmp = tempfile.mkstemp(prefix=".attnrewrite-validate-", suffix=".onnx", dir=base_dir)
        os.close(fd)
        try:
            onnx.save(proto, tmp)
            return cpu_session(tmp)
        finally:
            os.unlink(tmp)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise AttnRewriteError(f"onnxruntime cannot load the model: {ort_message(exc)}") from exc


def session_from_path(path: str | os.PathLike, extra_outputs: Iterable[str] = ()) -> ort.InferenceSession:
    """A session for a model file as it is on disk (the honest reference for the original).

    A file that onnxruntime itself cannot load is bad input (exit 2), not a failure of ours: exporters
    do emit such models (e.g. opset-18 attributes under an opset-17 import).
    """
    extra = list(extra_outputs)
    if not extra:
        try:
            return cpu_session(str(path))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"onnxruntime cannot load {path} as it is: {ort_message(exc)}") from exc
    proto = onnx.load(str(path), load_external_data=False)
    try:
        return make_session(proto, Path(path).resolve().parent, extra)
    except AttnRewriteError:
        session_from_path(path)  # raises InputError when the file itself does not load
        raise


def run_batches(
    session: ort.InferenceSession,
    batches: list[dict[str, np.ndarray]],
    names: list[str] | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    """Run every batch; returns outputs concatenated along the batch axis, by name."""
    names = names or [o.name for o in session.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds in batches:
        try:
            outs = session.run(names, feeds)
        except Exception as exc:  # noqa: BLE001
            raise AttnRewriteError(f"onnxruntime failed while running the model: {ort_message(exc)}") from exc
        for name, out in zip(names, outs):
            collected[name].append(np.asarray(out))
        if progress:
            progress()
    return {n: _concat(parts) for n, parts in collected.items()}


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    if all(p.ndim >= 1 for p in parts):
        return np.concatenate(parts, axis=0)
    return np.stack(parts)
