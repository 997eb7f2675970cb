"""The pass registry: names, typed parameters, and parsing of `--pass name:key=value,...`.

A pass is a small object with a name, declared parameters, an applicability check that returns a
reason (or None), and a rewrite that consumes an `AttentionSite` and returns the new attention output
as `[B, h, Nq, dv]`. Built-in passes live in `attnrewrite.passes`; third-party packages add theirs
through the `attnrewrite.passes` entry-point group (each entry point names a Pass instance or class).
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib import metadata
from typing import Any, Callable, Protocol

import onnx_ir as ir

from attnrewrite.errors import InputError
from attnrewrite.site import AttentionSite

_BUILTIN_MODULES = (
    "attnrewrite.passes.sdpa",
    "attnrewrite.passes.linear",
    "attnrewrite.passes.window",
    "attnrewrite.passes.neighborhood",
)


@dataclasses.dataclass(frozen=True)
class Param:
    """One typed pass parameter; `parse` turns the command-line text into the value."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    def convert(self, text: str) -> Any:
        if self.choices is not None and text not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}")
        return self.parse(text)


class Pass(Protocol):
    name: str
    params: tuple[Param, ...]
    exact: bool  # True when the rewrite is meant to reproduce the original (drift ~1e-6)
    description: str

    def applies(self, site: AttentionSite, options: dict[str, Any]) -> str | None: ...

    def rewrite(self, graph: ir.Graph, site: AttentionSite, options: dict[str, Any]) -> ir.Value: ...


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """A pass with validated options, as given by one `--pass` argument."""

    impl: Pass
    options: dict[str, Any]
    text: str

    @property
    def name(self) -> str:
        return self.impl.name

    def label(self) -> str:
        """Compact provenance label, e.g. `window[size=7x7,shift=half]`."""
        changed = {k: v for k, v in self.options.items() if v != _param(self.impl, k).default}
        inner = ",".join(f"{k}={_fmt(v)}" for k, v in changed.items())
        return f"{self.name}[{inner}]" if inner else self.name


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def _param(impl: Pass, name: str) -> Param:
    return next(p for p in impl.params if p.name == name)


_REGISTRY: dict[str, Pass] = {}
_LOADED = False


def register(impl: Pass) -> Pass:
    """Add a pass (built-in modules call this at import time)."""
    _REGISTRY[impl.name] = impl
    return impl


def available() -> dict[str, Pass]:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        for entry in metadata.entry_points(group="attnrewrite.passes"):
            obj = entry.load()
            register(obj() if isinstance(obj, type) else obj)
    return dict(_REGISTRY)


def parse_pass(text: str) -> PassSpec:
    """`window:size=7x7,shift=half` → PassSpec; any mistake is one InputError listing what is valid."""
    passes = available()
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in passes:
        raise InputError(f"unknown pass {name!r}; available passes: {', '.join(sorted(passes))}.")
    impl = passes[name]
    options = {p.name: p.default for p in impl.params}
    valid = ", ".join(f"{p.name}" + (f" ({'|'.join(p.choices)})" if p.choices else "") for p in impl.params)
    for item in filter(None, (s.strip() for s in rest.split(","))) if rest else []:
        key, eq, value = item.partition("=")
        if not eq:
            raise InputError(f"pass {name}: parameter {item!r} needs a value (key=value); valid parameters: {valid or 'none'}.")
        param = next((p for p in impl.params if p.name == key.strip()), None)
        if param is None:
            raise InputError(f"pass {name} has no parameter {key.strip()!r}; valid parameters: {valid or 'none'}.")
        try:
            options[param.name] = param.convert(value.strip())
        except (ValueError, TypeError) as exc:
            raise InputError(f"pass {name}: invalid {param.name}={value.strip()!r} ({exc}).") from None
    return PassSpec(impl=impl, options=options, text=text)


# --- parameter parsers shared by passes ---------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def size2d(text: str) -> tuple[int, int]:
    """`7` → (7, 7); `7x5` → (7, 5)."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError("expected N or HxW")
    h, w = (positive_int(p) for p in parts)
    return h, w
