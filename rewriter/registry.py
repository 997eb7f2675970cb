"""The pass contract, the registry, and parsing of `--pass name:key=value,...`.

A pass is a small object with a name, declared parameters and up to four steps, all declared in
`Pass` below so nothing is found by `getattr`:

    applies(site, options) -> reason | Plan     may this pass rewrite the site, and how (decided once)
    fit(site, activations, plan) -> Plan        optional: fit constants on calibration activations
    rewrite(graph, site, plan) -> ir.Value      emit the new attention, `[B, h, Nq, dv]`
    ensures(outcome)                            optional: enforce the pass's own promise on the drift

Every pass, built-in or third-party, registers through the `attnrewrite.passes` entry-point group
(each entry point names a Pass instance or class); the core holds no list of modules.
"""

from __future__ import annotations

import dataclasses
from importlib import metadata
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np
import onnx_ir as ir

from attnrewrite.errors import InputError
from attnrewrite.site import AttentionSite

ENTRY_POINT_GROUP = "attnrewrite.passes"


@dataclasses.dataclass(frozen=True)
class Param:
    """One typed pass parameter: `parse` reads the command-line text, `show` writes a value back in
    the same syntax (so `attnrewrite passes` prints defaults the parser accepts)."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    show: Callable[[Any], str] = str

    def convert(self, text: str) -> Any:
        if self.choices is not None and text not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}")
        return self.parse(text)

    def to_json(self) -> dict:
        return {"name": self.name, "default": self.show(self.default), "choices": list(self.choices) if self.choices else None,
                "help": self.help}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `applies` decided for one site; `rewrite` (and `fit`) receive it instead of recomputing.

    Passes subclass it with the fields they decide (a spatial frame, fitted constants)."""

    options: Mapping[str, Any]
    #: the pipeline collects this site's calibration Q/K/V/bias/output and calls `fit`
    needs_fit: bool = False
    #: what `fit` learns is only meaningful on real inputs (static scales, block masks): seeded
    #: random calibration is refused with a sentence instead of silently fitting noise
    needs_calibration: bool = False

    def summary(self) -> dict[str, Any]:
        """What was decided or fitted at this site, for the report: short values, lists per head."""
        return {}


@dataclasses.dataclass(frozen=True)
class SiteDrift:
    """One rewritten site's local drift (new vs original attention on identical inputs)."""

    site: AttentionSite
    plan: Plan
    metrics: Mapping[str, float]


@runtime_checkable
class Pass(Protocol):
    name: str
    params: tuple[Param, ...]
    exact: bool  # True when the rewrite is meant to reproduce the original (drift at float rounding)
    description: str

    def applies(self, site: AttentionSite, options: Mapping[str, Any]) -> str | Plan:
        """A reason the pass does not apply (shown to the user), or the plan for this site."""

    def fit(self, site: AttentionSite, activations: Mapping[str, np.ndarray], plan: Plan) -> Plan:
        """Called when `plan.needs_fit`: activations are `q, k, v, output` as `[B, h, N, d]` (+ `bias`)."""

    def rewrite(self, graph: ir.Graph, site: AttentionSite, plan: Plan) -> ir.Value:
        """Add the new attention to `graph`; returns it as `[B, h, Nq, dv]`."""

    def ensures(self, drift: SiteDrift) -> None:
        """Raise `PostconditionError` when the pass broke its own promise at this site."""


class BasePass:
    """Defaults for the optional steps: nothing to fit, no promise beyond the budget."""

    name: str
    params: tuple[Param, ...] = ()
    exact: bool = False
    description: str = ""

    def fit(self, site: AttentionSite, activations: Mapping[str, np.ndarray], plan: Plan) -> Plan:
        return plan

    def ensures(self, drift: SiteDrift) -> None:
        return None


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
        params = {p.name: p for p in self.impl.params}
        changed = {k: v for k, v in self.options.items() if v != params[k].default}
        inner = ",".join(f"{k}={params[k].show(v)}" for k, v in changed.items())
        return f"{self.name}[{inner}]" if inner else self.name

    def applies(self, site: AttentionSite) -> str | Plan:
        return self.impl.applies(site, self.options)


_REGISTRY: dict[str, Pass] = {}
_LOADED = False


def register(impl: Pass) -> Pass:
    """Add a pass in this process (entry points are the way to ship one; this is for scripts and tests)."""
    _REGISTRY[impl.name] = impl
    return impl


def available() -> dict[str, Pass]:
    """Every pass of the `attnrewrite.passes` entry-point group (built-in ones included), by name."""
    global _LOADED
    if not _LOADED:
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = entry.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the tool down
                raise InputError(f"the pass entry point {entry.name} = {entry.value} cannot be loaded: {exc}") from exc
            impl = obj() if isinstance(obj, type) else obj
            _REGISTRY.setdefault(entry.name, impl)
        _LOADED = True  # only once every entry point loaded: a broken one keeps failing loudly
    if not _REGISTRY:
        raise InputError("no passes are registered: install attnrewrite (pip install -e .) so its entry points exist.")
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


def describe_passes() -> list[dict]:
    """Every pass with its parameters, defaults in the syntax `--pass` accepts, for `passes --json`."""
    return [
        {"name": name, "exact": impl.exact, "description": impl.description,
         "params": [p.to_json() for p in impl.params]}
        for name, impl in sorted(available().items())
    ]


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


def size2d(text: str) -> tuple[int, ...]:
    """`7` → (7, 7); `7x5` → (7, 5); `4x7x7` → (4, 7, 7) for 3-D (video) grids."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) not in (2, 3):
        raise ValueError("expected N, HxW or FxHxW")
    return tuple(positive_int(p) for p in parts)


def show_size(value: tuple[int, ...]) -> str:
    """(7, 7) → `7x7`: the inverse of `size2d`."""
    return "x".join(str(v) for v in value)
