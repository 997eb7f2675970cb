"""Calibration inputs: what validation feeds both models, from a file, a folder, or a seeded RNG.

Drift numbers are only as good as the inputs behind them, so every mismatch (a missing key, a wrong
shape or dtype, NaN, a pickled npz that could run code, token ids past the embedding table) is
refused with one sentence instead of being quietly "fixed". Random inputs respect what an input
means: token ids inside the embedding table, 0/1 masks with padding at the end of some rows,
zeros for token types, 0..L-1 for positions.

For every input the leading axis is the sample axis: a calibration file holds N samples stacked
on axis 0, and they are cut into feed dicts of the model's batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import onnx

from attnrewrite.errors import InputError
from attnrewrite.ir.dtypes import numpy_dtype

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
#: Samples per onnxruntime call when the model's batch dim is dynamic and nothing else says.
BATCH_SIZE = 8
#: Token ids are drawn from [0, DEFAULT_VOCAB) when the model does not reveal its table size.
DEFAULT_VOCAB = 1000
#: Ops through which an integer input still reaches a Gather unchanged in value.
_VALUE_PRESERVING = {"Cast", "Identity", "Unsqueeze", "Reshape", "Flatten", "Squeeze"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input. `shape` holds ints (static), strings (named dynamic) or None (anonymous dynamic).

    `index_limit` is the row count of the table this input indexes through a Gather (an embedding),
    when the graph shows it; random ids stay below it and file ids are checked against it.
    `rank_known` is False for an input declared without any shape, which then needs --shape.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    index_limit: int | None = None
    rank_known: bool = True


@dataclasses.dataclass
class CalibrationSet:
    """Feed dicts ready for `InferenceSession.run`, plus a description for reports."""

    batches: list[dict[str, np.ndarray]]
    source: str
    num_samples: int


# --------------------------------------------------------------------------- model inputs


def input_specs(model: str | os.PathLike | onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs, in graph order (initializers listed as inputs by old exporters are skipped)."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        if not Path(model).is_file():
            raise InputError(f"model file {model} does not exist.")
        try:
            proto = onnx.load(str(model), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises a zoo of types
            raise InputError(f"{model} is not a readable ONNX model ({type(exc).__name__}).") from None
    inits = {t.name for t in proto.graph.initializer}
    limits = _gather_limits(proto.graph)
    specs = []
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        ttype = inp.type.tensor_type
        dtype = numpy_dtype(ttype.elem_type)
        if dtype is None:
            type_name = onnx.TensorProto.DataType.Name(ttype.elem_type) if ttype.elem_type else "non-tensor"
            raise InputError(f"input {inp.name!r} has element type {type_name}, which attnrewrite cannot feed.")
        rank_known = ttype.HasField("shape")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim)
        specs.append(InputSpec(inp.name, np.dtype(dtype), dims, limits.get(inp.name), rank_known))
    return specs


def _gather_limits(graph: onnx.GraphProto) -> dict[str, int]:
    """Input name → rows of the constant table it indexes via Gather (smallest if several)."""
    tables = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tables[node.output[0]] = tuple(node.attribute[0].t.dims)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    limits: dict[str, int] = {}
    for inp in graph.input:
        frontier, seen = [inp.name], set()
        while frontier:
            value = frontier.pop()
            if value in seen:
                continue
            seen.add(value)
            for node in consumers.get(value, []):
                if node.op_type in _VALUE_PRESERVING and node.input[0] == value:
                    frontier.extend(node.output)
                elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == value:
                    shape = tables.get(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if shape and -len(shape) <= axis < len(shape):
                        rows = int(shape[axis])
                        limits[inp.name] = min(rows, limits.get(inp.name, rows))
                elif node.op_type == "EmbedLayerNormalization":  # ORT's fused BERT embedding
                    for pos, table in _FUSED_EMBEDDING_TABLES.items():
                        shape = tables.get(node.input[table]) if len(node.input) > table else None
                        if len(node.input) > pos and node.input[pos] == value and shape:
                            limits[inp.name] = min(int(shape[0]), limits.get(inp.name, int(shape[0])))
    return limits


#: EmbedLayerNormalization: ids input position → position of the table it indexes (word, segment, position).
_FUSED_EMBEDDING_TABLES = {0: 2, 1: 4, 8: 3}


def parse_shape_overrides(texts: list[str] | tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """`["pixel_values=1x3x224x224"]` → {"pixel_values": (1, 3, 224, 224)}; sizes must be positive."""
    out: dict[str, tuple[int, ...]] = {}
    for text in texts:
        m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d+(?:\s*[xX]\s*\d+)*)\s*", text)
        if not m:
            raise InputError(f"cannot read --shape {text!r}; write NAME=AxBxC, e.g. pixel_values=1x3x224x224.")
        name = m.group(1)
        dims = tuple(int(x) for x in re.split(r"\s*[xX]\s*", m.group(2)))
        if 0 in dims:
            raise InputError(f"--shape {text!r} has a zero-sized dim; every size must be at least 1.")
        if name in out and out[name] != dims:
            raise InputError(f"--shape gives {name!r} twice with different sizes ({out[name]} and {dims}).")
        out[name] = dims
    return out


def resolve_shapes(specs: list[InputSpec], overrides: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Concrete shape for every input: static dims as declared, dynamic dims from `overrides`.

    A dynamic *leading* dim without an override defaults to 1, because it is almost always the
    batch axis and a batch of one is the honest default; any other dynamic dim (sequence length,
    image size) changes what the model computes, so it must come from `--shape name=AxBxC`.
    An override must have the input's rank and agree with its static dims.
    """
    names = [s.name for s in specs]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise InputError(f"--shape names unknown inputs {unknown}; the model's inputs are {names}.")
    shapes = {}
    for spec in specs:
        if spec.name in overrides:
            shape = tuple(int(x) for x in overrides[spec.name])
            if spec.rank_known and len(shape) != len(spec.shape):
                raise InputError(
                    f"--shape {spec.name} has rank {len(shape)} but the input has rank {len(spec.shape)} "
                    f"({_dims_text(spec.shape)})."
                )
            for i, (want, have) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int) and want != have:
                    raise InputError(f"--shape {spec.name}: dim {i} is fixed at {want} by the model, got {have}.")
            shapes[spec.name] = shape
            continue
        if not spec.rank_known:
            raise InputError(f"input {spec.name!r} declares no shape; pass --shape {spec.name}=AxBxC with its concrete sizes.")
        shape = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
            elif i == 0:
                shape.append(1)
            else:
                raise InputError(
                    f"input {spec.name!r} has dynamic dim {i} ({d or '?'}); pass --shape {spec.name}="
                    f"{_dims_text(spec.shape)} with concrete sizes."
                )
        shapes[spec.name] = tuple(shape)
    return shapes


def _dims_text(shape) -> str:
    return "x".join(str(d) if isinstance(d, int) else (d or "N") for d in shape) or "scalar"


# --------------------------------------------------------------------------- loading


def load_calibration(
    source: str | os.PathLike | None,
    specs: list[InputSpec],
    overrides: dict[str, tuple[int, ...]] | None = None,
    *,
    num_samples: int = 8,
    seed: int = 0,
    vocab_size: int | None = None,
    batch_size: int = BATCH_SIZE,
) -> CalibrationSet:
    """Calibration batches from `source`: None (seeded random), a `.npz`, or a folder of `.npy`/images.

    Random data: `num_samples` is rounded up to whole batches (the batch is the resolved leading
    dim, 1 unless `--shape` says otherwise). Token ids are drawn below `vocab_size`, also below the
    embedding table size when the graph reveals it (`InputSpec.index_limit`), else below 1000.
    File data: the leading axis counts samples; batches have the model's static batch size, the
    leading dim of a `--shape` override, or `batch_size`, in that order.
    """
    overrides = dict(overrides or {})
    if num_samples < 1:
        raise InputError(f"the number of calibration samples must be at least 1, got {num_samples}.")
    if source is None or str(source) == "":
        return _random_set(specs, resolve_shapes(specs, overrides), num_samples, seed, vocab_size)
    path = Path(source)
    if not path.exists():
        raise InputError(f"calibration source {path} does not exist.")
    if path.is_dir():
        arrays, desc = _from_folder(path, specs, overrides)
    elif path.suffix.lower() == ".npz":
        arrays, desc = _from_npz(path), f"npz:{path} sha256={_sha256_files([path])}"
    else:
        raise InputError(f"calibration source {path} must be a .npz file or a folder of .npy or image files.")
    return _checked_set(arrays, specs, overrides, desc, batch_size)


def _sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        if len(files) > 1:
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise InputError(f"{path} holds pickled (object) data, which is refused for safety; save plain numeric arrays.") from None
        raise InputError(f"{path} is not a readable .npy file ({exc}).") from None
    except (OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npy file ({exc}).") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path} is not a single .npy array.")
    return arr


def _from_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InputError(f"{path} holds pickled data, which is refused for safety; save plain numeric arrays with np.savez.") from None
        raise InputError(f"{path} is not a readable .npz file ({exc}).") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc}).") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"{path} holds a single array, not an .npz archive keyed by input names.")
    try:
        with data:
            return {k: data[k] for k in data.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise InputError(f"{path} holds pickled (object) arrays, which are refused for safety; save plain numeric arrays.") from None
        raise InputError(f"{path} is not a readable .npz file ({exc}).") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc}).") from None


def _from_folder(folder: Path, specs: list[InputSpec], overrides) -> tuple[dict[str, np.ndarray], str]:
    """`<input>.npy` / `<input>_<k>.npy` files (ordered by k), or image files for a one-image-input model."""
    names = {s.name for s in specs}
    files = sorted(f for f in folder.iterdir() if f.is_file())
    npy_files = [f for f in files if f.suffix.lower() == ".npy"]
    images = [f for f in files if f.suffix.lower() in _IMAGE_SUFFIXES]
    if npy_files and images:
        raise InputError(f"calibration folder {folder} holds both .npy and image files; keep only one kind.")
    if images:
        arrays = _images(images, specs, overrides)
        return arrays, f"images:{folder} n={len(images)} sha256={_sha256_files(images)}"
    if not npy_files:
        raise InputError(f"calibration folder {folder} has no .npy or image files.")
    parts: dict[str, list[tuple[int, Path]]] = {}
    for f in npy_files:
        stem = f.name[: -len(f.suffix)]
        m = re.fullmatch(r"(.+)_(\d+)", stem)
        if stem in names:
            key, order = stem, -1
        elif m and m.group(1) in names:
            key, order = m.group(1), int(m.group(2))
        else:
            raise InputError(f"{f.name} does not name a model input; expected <input>.npy or <input>_<k>.npy for inputs {sorted(names)}.")
        parts.setdefault(key, []).append((order, f))
    stacked = {}
    for key, entries in parts.items():
        entries.sort(key=lambda e: e[0])
        spec = next(s for s in specs if s.name == key)
        arrays = [_load_npy(f) for _, f in entries]
        # A file of the input's full rank holds several samples; one rank lower holds one sample.
        arrays = [a[None] if spec.rank_known and a.ndim == len(spec.shape) - 1 else a for a in arrays]
        if len({a.shape[1:] for a in arrays}) > 1 or len({a.ndim for a in arrays}) > 1:
            shapes = sorted({a.shape for a in arrays})
            raise InputError(f"the .npy files for {key!r} disagree on shape ({shapes}); every sample must have the same shape.")
        if any(a.ndim == 0 for a in arrays):
            raise InputError(f"the .npy files for {key!r} hold scalars; each file needs at least a sample axis.")
        stacked[key] = np.concatenate(arrays, axis=0)
    used = [f for entries in parts.values() for _, f in entries]
    return stacked, f"npy:{folder} files={len(used)} sha256={_sha256_files(sorted(used))}"


def _images(files: list[Path], specs: list[InputSpec], overrides) -> dict[str, np.ndarray]:
    """Resize to the input's H×W, scale to [0, 1], normalise with ImageNet mean/std, stack as NCHW."""
    if len(specs) != 1 or len(specs[0].shape) != 4 or not np.issubdtype(specs[0].dtype, np.floating):
        raise InputError("an image folder can only calibrate a model whose single input is a float [N, C, H, W] tensor.")
    spec = specs[0]
    channels, height, width = resolve_shapes(specs, overrides)[spec.name][1:]
    if channels not in (1, 3):
        raise InputError(f"input {spec.name!r} has {channels} channels; images can feed only 1 or 3 channels.")
    try:
        from PIL import Image
    except ImportError:
        raise InputError("loading images needs Pillow (pip install pillow); or pass a .npz instead.") from None
    batch = []
    for f in files:
        try:
            with Image.open(f) as img:
                img = img.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
                arr = np.asarray(img, np.float32) / 255.0
        except (OSError, ValueError) as exc:
            raise InputError(f"{f} is not a readable image ({exc}).") from None
        if channels == 3:
            arr = ((arr - _IMAGENET_MEAN) / _IMAGENET_STD).transpose(2, 0, 1)
        else:
            arr = ((arr - _IMAGENET_MEAN.mean()) / _IMAGENET_STD.mean())[None]
        batch.append(arr)
    return {spec.name: np.stack(batch).astype(spec.dtype)}


# --------------------------------------------------------------------------- checking


def _checked_set(arrays: dict[str, np.ndarray], specs: list[InputSpec], overrides, desc: str, batch_size: int) -> CalibrationSet:
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = sorted(k for k in arrays if k not in names)
    if missing or extra:
        raise InputError(f"calibration keys must be exactly the model's inputs {names}; missing {missing}, unexpected {extra}.")
    count = None
    fixed = {}
    for spec in specs:
        arr = _cast(spec, np.asarray(arrays[spec.name]))
        want = _expected_shape(spec, overrides)
        if arr.ndim != len(want) or arr.ndim == 0:
            raise InputError(
                f"calibration {spec.name!r} has shape {arr.shape} but the model wants rank {len(want)} "
                f"({_dims_text(want)}), with samples stacked on axis 0."
            )
        for i, (w, have) in enumerate(zip(want, arr.shape)):
            if i > 0 and isinstance(w, int) and w != have:
                raise InputError(f"calibration {spec.name!r} has shape {arr.shape}; dim {i} must be {w} ({_dims_text(want)}).")
        if spec.index_limit is not None and arr.size and np.issubdtype(arr.dtype, np.integer):
            lo, hi = int(arr.min()), int(arr.max())
            if hi >= spec.index_limit or lo < -spec.index_limit:
                raise InputError(
                    f"calibration {spec.name!r} has values in [{lo}, {hi}] but it indexes a table of {spec.index_limit} rows."
                )
        if count is None:
            count = arr.shape[0]
        elif arr.shape[0] != count:
            raise InputError(f"calibration inputs disagree on the number of samples ({count} vs {arr.shape[0]} in {spec.name!r}).")
        fixed[spec.name] = arr
    if not count:
        raise InputError("calibration data holds no samples.")
    step = _file_batch_size(specs, overrides, batch_size)
    if any(isinstance(s.shape[0], int) for s in specs if s.shape) or any(s in overrides for s in names):
        if count % step:
            raise InputError(f"the model's batch is fixed at {step} but calibration holds {count} samples; give a multiple of {step}.")
    batches = [{k: np.ascontiguousarray(v[i:i + step]) for k, v in fixed.items()} for i in range(0, count, step)]
    return CalibrationSet(batches=batches, source=desc, num_samples=count)


def _expected_shape(spec: InputSpec, overrides) -> tuple:
    if spec.name in overrides:
        return tuple(overrides[spec.name])
    return spec.shape


def _file_batch_size(specs: list[InputSpec], overrides, default: int) -> int:
    for spec in specs:
        if spec.name in overrides:
            return int(overrides[spec.name][0])
        if spec.shape and isinstance(spec.shape[0], int):
            return spec.shape[0]
    if default < 1:
        raise InputError(f"the calibration batch size must be at least 1, got {default}.")
    return default


def _cast(spec: InputSpec, arr: np.ndarray) -> np.ndarray:
    """Accept only casts that cannot change a value: float→float (finite after), int→int in range, 0/1→bool."""
    src, dst = arr.dtype, spec.dtype
    if not (np.issubdtype(src, np.number) or src == np.bool_):
        raise InputError(f"calibration {spec.name!r} has dtype {src}, which is not numeric; the model wants {dst}.")
    if np.issubdtype(src, np.floating) and not np.all(np.isfinite(arr)):
        raise InputError(f"calibration {spec.name!r} contains NaN or infinite values.")
    if src == dst:
        return arr
    src_float, dst_float = np.issubdtype(src, np.floating), np.issubdtype(dst, np.floating)
    if np.issubdtype(src, np.complexfloating) or src_float != dst_float:
        kind = "floating-point" if src_float else "integer"
        raise InputError(
            f"calibration {spec.name!r} has dtype {src} but the model wants {dst}; {kind} data is not cast to "
            f"{'integers' if not dst_float else 'floats'} implicitly, so save it as {dst}."
        )
    if dst_float:
        with np.errstate(over="ignore"):
            out = arr.astype(dst)
        if not np.all(np.isfinite(out)):
            raise InputError(f"calibration {spec.name!r} has values too large for the model's {dst}.")
        return out
    if dst == np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise InputError(f"calibration {spec.name!r} must hold only 0/1 to feed a bool input.")
        return arr.astype(np.bool_)
    info = np.iinfo(dst)
    if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
        raise InputError(f"calibration {spec.name!r} has values outside the range of the model's {dst}.")
    return arr.astype(dst)


# --------------------------------------------------------------------------- random data


def _random_set(specs, shapes, num_samples: int, seed: int, vocab_size: int | None) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    lead = [shapes[s.name][0] for s in specs if shapes[s.name]]
    per_batch = max(1, lead[0]) if lead else 1
    batches = []
    done = 0
    while done < num_samples:
        batches.append({s.name: random_input(s, shapes[s.name], rng, vocab_size=vocab_size, first_sample=done) for s in specs})
        done += per_batch
    vocab = f", vocab={vocab_size}" if vocab_size else ""
    return CalibrationSet(batches=batches, source=f"random(seed={seed}, n={done}{vocab})", num_samples=done)


def random_input(
    spec: InputSpec,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    *,
    vocab_size: int | None = None,
    first_sample: int = 0,
) -> np.ndarray:
    """One random tensor whose values make sense for the input's name and dtype.

    `first_sample` is the global index of this tensor's first row, so that masks pad every other
    *sample* even when batches hold one sample each.
    """
    name = spec.name.lower()
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if "mask" in name:
        return _padding_mask(shape, spec.dtype, rng, first_sample)
    if spec.dtype == np.bool_:
        return rng.random(shape) < 0.5
    if "token_type" in name or "segment" in name:
        return np.zeros(shape, dtype=spec.dtype)
    limit = spec.index_limit
    if "position" in name and shape:
        pos = np.broadcast_to(np.arange(shape[-1]), shape)
        return np.minimum(pos, (limit or shape[-1]) - 1).astype(spec.dtype)
    if "input_ids" in name or limit is not None:
        high = vocab_size or limit or DEFAULT_VOCAB
        if limit is not None:
            high = min(high, limit)
        high = min(high, int(np.iinfo(spec.dtype).max) + 1)
        return rng.integers(0, max(1, high), size=shape).astype(spec.dtype)
    return rng.integers(0, 4, size=shape).astype(spec.dtype)


def _padding_mask(shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator, first_sample: int) -> np.ndarray:
    """1 = keep. Odd-numbered samples are padded at the end (random length ≥ 1 token, < full length)."""
    arr = np.ones(shape, dtype=dtype)
    if not shape or shape[-1] < 2:
        return arr
    rows = shape[0] if len(shape) >= 2 else 1
    length = shape[-1]
    for row in range(rows):
        if (first_sample + row) % 2 == 1:
            keep = int(rng.integers(max(1, length // 2), length))
            if len(shape) >= 2:
                arr[row, ..., keep:] = 0
            else:
                arr[keep:] = 0
    return arr
