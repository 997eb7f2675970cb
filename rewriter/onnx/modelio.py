"""Loading and saving ONNX models without ever damaging the user's files.

Deployment models are often > 2 GB and keep their weights in external data files. We load through
`onnx_ir`, which memory-maps external tensors instead of reading them, so inspecting a 1 GB model
costs little memory. Before trusting an external-data location we check that it stays inside the
model's folder: a crafted model must not make us read `/etc/passwd` or `../../secret`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from attnrewrite.errors import InputError

#: Protobuf cannot serialise a single message above 2 GiB; above this we always use external data.
PROTOBUF_LIMIT = 2**31 - 1
#: Tensors at least this large go to the external data file when one is written.
EXTERNAL_THRESHOLD_BYTES = 1024


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load `path` as an `ir.Model`, validating the file and every external-data reference first."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file.")
    if not path.is_file():
        raise InputError(f"{path}: is not a file.")
    proto = _read_proto(path)
    check_external_data(proto, path.parent)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(path.parent.resolve()))
    return model


def _read_proto(path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(exc)}).") from exc
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise InputError(f"{path}: not an ONNX model (no graph found; is the file truncated?).")
    return proto


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _external_tensors(proto: onnx.ModelProto):
    """Every TensorProto in the model (main graph, subgraphs, Constant attributes) stored externally."""
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def check_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse absolute or escaping locations, and missing or too-short data files, with one sentence."""
    base = base_dir.resolve()
    sizes: dict[Path, int] = {}
    for tensor in _external_tensors(proto):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise InputError(f"tensor {tensor.name!r} is external but has no location.")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise InputError(
                f"tensor {tensor.name!r} points to an absolute external-data path {location!r}; "
                "only paths inside the model's folder are accepted."
            )
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise InputError(
                f"tensor {tensor.name!r} points to external data {location!r} outside the model's folder."
            )
        if target not in sizes:
            if not target.is_file():
                raise InputError(f"external data file {location!r} (needed by tensor {tensor.name!r}) is missing.")
            sizes[target] = target.stat().st_size
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > sizes[target]:
            raise InputError(
                f"external data file {location!r} is truncated: tensor {tensor.name!r} needs bytes up to {end}, "
                f"file has {sizes[target]}."
            )


def uses_external_data(model: ir.Model) -> bool:
    return any(isinstance(t.const_value, ir.ExternalTensor) for t in model.graph.initializers.values())


def weight_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    force: bool = False,
    external_data: bool | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write `model` to `path` atomically; returns the path.

    `external_data=None` keeps external data when the input had it, and switches to it on its own
    above protobuf's 2 GB limit. `protect` lists files that must never be overwritten (the inputs).
    """
    path = Path(path)
    for guarded in protect:
        if Path(guarded).resolve() == path.resolve():
            raise InputError(f"refusing to write the output over the input model {path}.")
    if path.exists() and not force:
        raise InputError(f"{path} already exists; pass --force to overwrite it.")
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist.")
    if external_data is None:
        external_data = uses_external_data(model) or weight_bytes(model) > PROTOBUF_LIMIT // 2
    data_name = path.name + ".data" if external_data else None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if data_name is not None:
            ir.save(model, tmp_name, external_data=data_name, size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES)
        else:
            ir.save(model, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path
