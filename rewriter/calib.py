"""Calibration inputs: what validation feeds both models, from a file, a folder, or a seeded RNG.

Drift numbers are only as good as the inputs behind them, so every mismatch (a missing key, a wrong
shape or dtype, NaN, a pickled npz that could run code) is refused with one sentence instead of
being quietly "fixed". Random inputs respect what the input means: token ids in range, 0/1 masks
with padding at the end of some rows, zeros for token types.
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

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.INT16: np.int16,
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
#: Samples per onnxruntime call when a calibration file holds many.
BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    #: rows of the embedding table this input indexes (token ids must stay below it)
    vocab: int | None = None


@dataclasses.dataclass
class CalibrationSet:
    batches: list[dict[str, np.ndarray]]
    source: str
    num_samples: int


def input_specs(model: str | os.PathLike | onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs by old exporters are skipped)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    specs = []
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        ttype = inp.type.tensor_type
        dtype = _ONNX_TO_NUMPY.get(ttype.elem_type)
        if dtype is None:
            raise InputError(f"input {inp.name!r} has an element type attnrewrite cannot generate (onnx type {ttype.elem_type}).")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim)
        specs.append(InputSpec(inp.name, np.dtype(dtype), dims, _vocab_of(proto, inp.name)))
    return specs


def _vocab_of(proto: onnx.ModelProto, name: str) -> int | None:
    """Rows of the embedding table that `name` indexes: Gather(table, name) (maybe through a Cast)."""
    init_dims = {t.name: list(t.dims) for t in proto.graph.initializer}
    aliases = {name}
    for node in proto.graph.node:
        if node.op_type in ("Cast", "Identity") and node.input and node.input[0] in aliases:
            aliases.update(node.output)
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in aliases and node.input[0] in init_dims:
            dims = init_dims[node.input[0]]
            if dims:
                return int(dims[0])
    return None


def parse_shape_overrides(texts: list[str]) -> dict[str, tuple[int, ...]]:
    """`["pixel_values=1x3x224x224"]` → {"pixel_values": (1, 3, 224, 224)}."""
    out = {}
    for text in texts:
        m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d+(?:x\d+)*)\s*", text)
        if not m:
            raise InputError(f"cannot read --shape {text!r}; write NAME=AxBxC, e.g. pixel_values=1x3x224x224.")
        out[m.group(1)] = tuple(int(x) for x in m.group(2).split("x"))
    return out


def resolve_shapes(specs: list[InputSpec], overrides: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Concrete shapes; a dynamic leading (batch) dim defaults to 1, any other dynamic dim needs --shape."""
    names = {s.name for s in specs}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InputError(f"--shape names unknown inputs {unknown}; the model's inputs are {sorted(names)}.")
    shapes = {}
    for spec in specs:
        if spec.name in overrides:
            shape = overrides[spec.name]
            if len(shape) != len(spec.shape):
                raise InputError(f"--shape {spec.name} has rank {len(shape)} but the input has rank {len(spec.shape)}.")
            for i, (want, have) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int) and want != have:
                    raise InputError(f"--shape {spec.name}: dim {i} must be {want}, got {have}.")
            shapes[spec.name] = shape
            continue
        shape = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
            elif i == 0:
                shape.append(1)
            else:
                raise InputError(
                    f"input {spec.name!r} has dynamic dim {i} ({d or '?'}); pass --shape {spec.name}=" + "x".join(
                        str(x) if isinstance(x, int) else ("1" if j == 0 else "N") for j, x in enumerate(spec.shape)) + " with N replaced by a size."
                )
        shapes[spec.name] = tuple(shape)
    return shapes


def load_calibration(
    source: str | os.PathLike | None,
    specs: list[InputSpec],
    overrides: dict[str, tuple[int, ...]] | None = None,
    *,
    num_samples: int = 8,
    seed: int = 0,
) -> CalibrationSet:
    overrides = overrides or {}
    if source is None:
        return _random_set(specs, resolve_shapes(specs, overrides), num_samples, seed)
    path = Path(source)
    if not path.exists():
        raise InputError(f"calibration source {path} does not exist.")
    if path.is_dir():
        arrays, desc = _from_folder(path, specs)
    elif path.suffix == ".npz":
        arrays, desc = _from_npz(path), f"npz:{path} sha256={_sha256(path)[:16]}"
    else:
        raise InputError(f"calibration source {path} must be a .npz file or a folder of .npy/image files.")
    return _checked_set(arrays, specs, overrides, desc)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _from_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise InputError(f"{path} holds pickled (object) arrays, which are refused for safety; save plain numeric arrays.") from None
        raise InputError(f"{path} is not a readable .npz file ({exc}).") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc}).") from None


def _from_folder(folder: Path, specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], str]:
    names = {s.name for s in specs}
    npy: dict[str, list[np.ndarray]] = {}
    images = []
    for f in sorted(folder.iterdir()):
        if f.suffix == ".npy":
            stem = f.stem
            key = stem if stem in names else re.sub(r"_\d+$", "", stem)
            if key not in names:
                raise InputError(f"{f.name} does not name a model input; expected one of {sorted(names)} (optionally _<k>).")
            try:
                arr = np.load(f, allow_pickle=False)
            except ValueError:
                raise InputError(f"{f} holds pickled (object) data, which is refused for safety.") from None
            npy.setdefault(key, []).append(arr)
        elif f.suffix.lower() in _IMAGE_SUFFIXES:
            images.append(f)
    if npy:
        stacked = {}
        for key, parts in npy.items():
            rank = len(_spec(specs, key).shape)
            stacked[key] = np.concatenate([a if a.ndim == rank else a[None] for a in parts])
        return stacked, f"folder:{folder} (npy)"
    if images:
        return _images(images, specs), f"folder:{folder} ({len(images)} images)"
    raise InputError(f"calibration folder {folder} has no .npy or image files.")


def _spec(specs: list[InputSpec], name: str) -> InputSpec:
    return next(s for s in specs if s.name == name)


def _images(files: list[Path], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    pixel = [s for s in specs if len(s.shape) == 4 and np.issubdtype(s.dtype, np.floating)]
    if len(specs) != 1 or len(pixel) != 1:
        raise InputError("an image folder can only calibrate a model with exactly one [N, C, H, W] float input.")
    spec = pixel[0]
    channels, height, width = spec.shape[1:]
    if not all(isinstance(x, int) for x in (channels, height, width)):
        raise InputError(f"input {spec.name!r} needs static C, H, W to load images; pass a .npz instead.")
    try:
        from PIL import Image
    except ImportError:
        raise InputError("loading images needs Pillow (pip install pillow), or pass a .npz.") from None
    batch = []
    for f in files:
        try:
            img = Image.open(f).convert("RGB" if channels == 3 else "L").resize((width, height))
        except OSError as exc:
            raise InputError(f"{f} is not a readable image ({exc}).") from None
        arr = np.asarray(img, np.float32) / 255.0
        if channels == 3:
            arr = ((arr - _IMAGENET_MEAN) / _IMAGENET_STD).transpose(2, 0, 1)
        else:
            arr = arr[None]
        batch.append(arr)
    return {spec.name: np.stack(batch).astype(spec.dtype)}


def _checked_set(arrays: dict[str, np.ndarray], specs, overrides, desc: str) -> CalibrationSet:
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        raise InputError(f"calibration keys must be the model's inputs {names}; missing {missing}, unexpected {extra}.")
    count = None
    fixed = {}
    for spec in specs:
        arr = arrays[spec.name]
        if arr.dtype != spec.dtype:
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind") or (
                np.issubdtype(arr.dtype, np.floating) != np.issubdtype(spec.dtype, np.floating)
            ):
                raise InputError(f"calibration {spec.name!r} has dtype {arr.dtype}, the model wants {spec.dtype}.")
            arr = arr.astype(spec.dtype)
        if arr.ndim != len(spec.shape):
            raise InputError(f"calibration {spec.name!r} has shape {arr.shape}, the model wants rank {len(spec.shape)} {spec.shape}.")
        for i, (want, have) in enumerate(zip(spec.shape, arr.shape)):
            if i > 0 and isinstance(want, int) and want != have:
                raise InputError(f"calibration {spec.name!r} has shape {arr.shape}; dim {i} must be {want}.")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise InputError(f"calibration {spec.name!r} contains NaN or infinite values.")
        if count is None:
            count = arr.shape[0]
        elif arr.shape[0] != count:
            raise InputError(f"calibration inputs disagree on the number of samples ({count} vs {arr.shape[0]} in {spec.name!r}).")
        fixed[spec.name] = arr
    if not count:
        raise InputError("calibration data holds no samples.")
    step = BATCH_SIZE
    if any(isinstance(s.shape[0], int) for s in specs):
        step = next(s.shape[0] for s in specs if isinstance(s.shape[0], int))
        if count % step:
            raise InputError(f"the model's batch is fixed at {step} but calibration holds {count} samples; give a multiple of {step}.")
    batches = [{k: v[i:i + step] for k, v in fixed.items()} for i in range(0, count, step)]
    return CalibrationSet(batches=batches, source=desc, num_samples=count)


def _random_set(specs, shapes, num_samples: int, seed: int) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    batches = []
    per_batch = max(1, shapes[specs[0].name][0]) if specs else 1
    done = 0
    while done < num_samples:
        batches.append({s.name: random_input(s, shapes[s.name], rng) for s in specs})
        done += per_batch
    return CalibrationSet(batches=batches, source=f"random(seed={seed}, n={done})", num_samples=done)


def random_input(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator, vocab: int = 1000) -> np.ndarray:
    name = spec.name.lower()
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if "mask" in name:
        arr = np.ones(shape, dtype=spec.dtype)
        if len(shape) >= 2 and shape[-1] > 2:
            for row in range(shape[0]):
                if row % 2 == 1:  # pad the tail of every other row
                    arr[row, ..., shape[-1] - max(1, shape[-1] // 4):] = 0
        return arr
    if "token_type" in name or "segment" in name:
        return np.zeros(shape, dtype=spec.dtype)
    if spec.dtype == np.bool_:
        return rng.random(shape) < 0.5
    if spec.vocab is not None or "ids" in name or "input" in name:
        return rng.integers(0, spec.vocab or vocab, size=shape).astype(spec.dtype)
    return rng.integers(0, 4, size=shape).astype(spec.dtype)
