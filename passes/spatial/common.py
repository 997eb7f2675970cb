"""What every spatial pass checks before touching a site, and the parameters they share.

Spatial passes need a token grid (traced back to the patch embedding) and self-attention. Prefix
tokens (CLS, distillation, registers) stay global by default: they attend to everything and every
grid token attends to them (`prefix=global`); `prefix=local` keeps them only with each other.
Already-windowed sites (Swin) can only be narrowed: the pass then acts inside each existing window.
Text has no patch embedding to trace prefix tokens from, so on 1-D sequences `global_tokens=N`
(default 1) names them: BERT-style encoders park much of their attention on [CLS] (an attention sink,
Clark et al. 2019; Longformer keeps it global for the same reason), and cutting it off costs far more
than the window itself.
"""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes.ops import const
from attnrewrite.registry import Param, Plan, non_negative_int
from attnrewrite.site import AttentionSite


def keep_global(text: str) -> int:
    """`none` → 0; `every:K` → K (every K-th site, counting from 1, keeps global attention)."""
    if text == "none":
        return 0
    m = re.fullmatch(r"every:(\d+)", text)
    if not m or int(m.group(1)) < 1:
        raise ValueError("use none or every:K with K >= 1")
    return int(m.group(1))


PREFIX = Param("prefix", str, "global", "global: prefix tokens see and are seen by all; local: only each other",
               choices=("global", "local"))
GLOBAL_TOKENS = Param(
    "global_tokens", non_negative_int, 1,
    "1-D sequences: the first N tokens (CLS, attention sinks) stay global, like grid prefix tokens")
LAYOUT = Param(
    "layout", str, "auto",
    "auto: the traced token grid, a 1-D sequence only for text; sequence: treat the tokens as a 1-D sequence",
    choices=("auto", "sequence"))
KEEP_GLOBAL = Param("keep_global", keep_global, 0, "every:K keeps every K-th site global (ViTDet style)",
                    show=lambda k: f"every:{k}" if k else "none")


@dataclasses.dataclass(frozen=True)
class SpatialPlan(Plan):
    """Where a spatial pass acts: the token grid (None: the 1-D token axis) and the tokens kept out
    of it (prefix/suffix tokens on a grid, `global_tokens` on a sequence)."""

    grid: tuple[int, ...] | None = None
    prefix: int = 0


def spatial_frame(site: AttentionSite, options: dict, *, allow_1d: bool) -> tuple[str | None, tuple[int, ...] | None, int]:
    """(reason it does not apply, grid to act on, prefix tokens); grid None means the 1-D token axis."""
    every = options.get("keep_global", 0)
    if every and (site.layer + 1) % every == 0:
        return f"kept global by keep_global=every:{every}", None, 0
    if site.kind != "self":
        return "cross-attention has no shared token grid", None, 0
    if site.q_len is None and (site.grid is not None or site.window is not None or not allow_1d):
        return "dynamic token count; the grid cannot be resolved statically", None, 0
    for name, value in (("Q", site.q), ("V", site.v)):
        if value.shape is None or len(value.shape) != 4 or not isinstance(value.shape[3], int):
            return f"the head dimension of {name} is not static, so tiles cannot be laid out", None, 0
    if options.get("layout") == "sequence":
        if not allow_1d:
            return "layout=sequence: this pass needs a token grid", None, 0
        return None, None, 0
    if site.window is not None:
        return None, site.window, 0
    if site.grid is not None and site.prefix_tokens is not None:
        if site.suffix_tokens and site.q_len is None:
            return "tokens follow the grid and the token count is dynamic", None, 0
        # tokens after the grid (YOLOS' detection tokens) are moved in front: see `grid_last`
        return None, site.grid, site.prefix_tokens + site.suffix_tokens
    if site.vision and site.q_len is None:
        return ("the image size is dynamic, so the token grid is not known; export with a fixed image size "
                "for spatial passes (linear, quant and sdpa serve any size)"), None, 0
    if site.vision:
        # the tokens come from a convolution: their order is spatial, and a 1-D window over it would
        # be a geometrically wrong rewrite reported as a success (issue: video tokens read as text)
        return ("vision tokens (from a convolution) with no token grid traced to a patch embedding; "
                "not rewritten as a 1-D sequence (layout=sequence asks for that)"), None, 0
    if allow_1d and site.grid is None:
        return None, None, 0
    return "no token grid traced to a patch embedding", None, 0


def sequence_prefix(site: AttentionSite, options: dict) -> tuple[str | None, int]:
    """(reason it does not apply, global tokens) for a 1-D sequence site."""
    n = options.get("global_tokens", 0)
    if site.q_len is not None and n >= site.q_len:
        return f"global_tokens={n} leaves none of the {site.q_len} tokens local", 0
    if site.q_len is None and site.bias is not None and not site.bias_per_key:
        # a padding mask can be gathered per key block whatever the length; a causal or relative
        # bias would need the [T, T] rows laid out, which needs the length
        return "the bias varies per query and the sequence length is dynamic (export with a fixed length)", 0
    return None, n


def narrower(site: AttentionSite, size: tuple[int, int]) -> str | None:
    """An already-windowed site only accepts windows strictly inside its own."""
    if site.window is None:
        return None
    if size[0] >= site.window[0] and size[1] >= site.window[1]:
        return f"already attends in {site.window[0]}x{site.window[1]} windows; {size[0]}x{size[1]} would not narrow it"
    return None


def fits(grid: tuple[int, ...], size: tuple[int, ...], what: str) -> str | None:
    if any(s > g for s, g in zip(size, grid)):
        return f"{what} {_x(size)} is larger than the {_x(grid)} grid"
    return None


def _x(values) -> str:
    return "x".join(str(v) for v in values)


def per_axis(value: tuple[int, ...], grid: tuple[int, ...], name: str) -> tuple[tuple[int, ...] | None, str | None]:
    """A size parameter on this grid: 2-D takes it as given; on a 3-D (F×H×W) grid `N` or `NxN`
    means N on every axis and `FxHxW` is per axis; anything else is the reason it does not apply."""
    if len(value) == len(grid):
        return tuple(value), None
    if len(grid) == 3 and len(value) == 2 and value[0] == value[1]:
        return (value[0],) * 3, None
    return None, f"{name}={_x(value)} does not fit the {_x(grid)} grid; give one size per axis ({'x'.join('N' * len(grid))})"


def only_2d(grid: tuple[int, ...] | None, what: str) -> str | None:
    if grid is not None and len(grid) != 2:
        return f"{what} is defined on 2-D grids; this site has a {_x(grid)} grid"
    return None


def grid_last(t: ir_tape.Tape, site: AttentionSite, emit) -> ir.Value:
    """Run `emit(q, k, v, bias)` with the tokens that follow the grid rotated to the front.

    The emitters lay out `[global tokens, grid]`; YOLOS-style models append their extra tokens after
    the grid. Attention is the same under any consistent reordering of tokens, so Q/K/V (and the
    bias axes that run over tokens) are rotated by the suffix length, and the output rotated back.
    """
    s = site.suffix_tokens
    if not s:
        return emit(site.q, site.k, site.v, site.bias)
    n = site.q_len

    def rotate(x, axis, shift):  # tokens [shift:] then [:shift]
        tail = t.op("Slice", [x, const(t, [shift]), const(t, [n]), const(t, [axis])])
        head = t.op("Slice", [x, const(t, [0]), const(t, [shift]), const(t, [axis])])
        return t.op("Concat", [tail, head], attributes={"axis": axis})

    q, k, v = (rotate(x, 2, n - s) for x in (site.q, site.k, site.v))
    for x, ref in zip((q, k, v), (site.q, site.k, site.v)):
        x.type, x.shape = ref.type, ref.shape
    bias = site.bias
    if bias is not None:
        rank = len(bias.shape)
        dims = list(bias.shape)
        for axis in (rank - 1, rank - 2):
            if axis >= 0 and dims[axis] != 1:
                bias = rotate(bias, axis, n - s)
        if bias is not site.bias:
            bias.type, bias.shape = site.bias.type, site.bias.shape
    out = emit(q, k, v, bias)
    restored = rotate(out, 2, s)
    restored.type, restored.shape = out.type, out.shape
    return restored


def in_token_order(site: AttentionSite, allowed):
    """An allowed mask laid out as the emitters see tokens (`grid_last`: tokens after the grid moved
    to the front) back in the site's own token order."""
    s = site.suffix_tokens
    if not s:
        return allowed
    import numpy as np

    n = allowed.shape[0]
    order = np.concatenate([np.arange(n - s, n), np.arange(0, n - s)])
    out = np.empty_like(allowed)
    out[np.ix_(order, order)] = allowed
    return out
