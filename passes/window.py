"""Window-family passes: `window` (Swin W-MSA / SW-MSA, `block` is the same), MaxViT `grid`, HaloNet `halo`.

All partition the token grid into fixed groups and attend inside each group, so the work is a few
Reshape/Transpose/Gather ops around one batched MatMul per group size. The math is defined once in
`spatial_reference.py` and the ONNX emission in `spatial_emit.py`; this file only decides where a
pass applies and with which settings.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes.spatial.common import (
    GLOBAL_TOKENS, KEEP_GLOBAL, LAYOUT, PREFIX, SpatialPlan, fits, grid_last, in_token_order, narrower, only_2d,
    per_axis, sequence_prefix, spatial_frame,
)
from attnrewrite.passes.spatial import reference as R
from attnrewrite.registry import BasePass, Param, non_negative_int, positive_int, show_size, size2d
from attnrewrite.site import AttentionSite


def _shift(site: AttentionSite, size: tuple[int, ...], mode: str) -> tuple[int, ...]:
    """Half-window shift for `half`, and for `alternate` on every odd site (Swin's SW-MSA blocks)."""
    if mode == "half" or (mode == "alternate" and site.layer % 2 == 1):
        return tuple(s // 2 for s in size)
    return (0,) * len(size)


class WindowPass(BasePass):
    exact = False
    description = "non-overlapping HxW (FxHxW on video) windows over the token grid (Swin, Video Swin); shift=half|alternate for SW-MSA; 1-D sliding window for text"
    params = (
        Param("size", size2d, (7, 7), "window size N, HxW or FxHxW (tokens along the sequence for 1-D)", show=show_size),
        Param("shift", str, "0", "0, half, or alternate (every other site shifted by half a window)",
              choices=("0", "half", "alternate")),
        PREFIX,
        GLOBAL_TOKENS,
        LAYOUT,
        KEEP_GLOBAL,
    )

    def __init__(self, name: str = "window"):
        self.name = name

    def applies(self, site: AttentionSite, options: dict) -> str | SpatialPlan:
        reason, grid, prefix = spatial_frame(site, options, allow_1d=True)
        if reason:
            return reason
        if grid is None:
            if options["size"][0] != options["size"][1] and options["size"][0] != 1:
                return "1-D sequences take a single window length (size=N)"
            reason, prefix = sequence_prefix(site, options)
            return reason or SpatialPlan(options, grid=None, prefix=prefix)
        size, reason = per_axis(options["size"], grid, "size")
        return reason or narrower(site, size) or fits(grid, size, "window") or SpatialPlan(
            options, grid=grid, prefix=prefix)

    def rewrite(self, graph: ir.Graph, site: AttentionSite, plan: SpatialPlan) -> ir.Value:
        from attnrewrite.passes.spatial import emit as E

        t = ir_tape.Tape(graph)
        options, grid, prefix = plan.options, plan.grid, plan.prefix
        size = options["size"]
        if grid is None:
            return E.emit_sliding_1d(t, site.q, site.k, site.v, scale=site.scale, bias=site.bias,
                                     window=max(size), mode="block", prefix=prefix, prefix_mode=options["prefix"],
                                     bias_per_key=site.bias_per_key)
        size, _ = per_axis(size, grid, "size")
        return grid_last(t, site, lambda q, k, v, bias: E.emit_window(
            t, q, k, v, scale=site.scale, bias=bias, grid=grid, prefix=prefix, size=size,
            shift=_shift(site, size, options["shift"]), prefix_mode=options["prefix"]))

    def allowed(self, site: AttentionSite, plan: SpatialPlan):
        """bool [N, N]: the keys each query sees, from the reference masks (the torch front-end's
        variant module; tested equal to what `rewrite` emits)."""
        options, grid, prefix = plan.options, plan.grid, plan.prefix
        if grid is None:
            local = site.q_len - prefix
            return R.allowed_sliding_1d(site.q_len, min(max(options["size"]), local), prefix, "block", options["prefix"])
        size, _ = per_axis(options["size"], grid, "size")
        shift = _shift(site, size, options["shift"])
        if len(grid) == 3:
            return in_token_order(site, R.allowed_window_3d(grid, prefix, size, shift, options["prefix"]))
        return in_token_order(site, R.allowed_window(grid, prefix, size, shift, options["prefix"]))


class GridPass(BasePass):
    name = "grid"
    exact = False
    description = "MaxViT grid attention: GxG groups of tokens strided across the whole grid"
    params = (Param("size", size2d, (7, 7), "grid G or GhxGw (tokens per group along each axis)", show=show_size),
              PREFIX, KEEP_GLOBAL)

    def applies(self, site: AttentionSite, options: dict) -> str | SpatialPlan:
        reason, grid, prefix = spatial_frame(site, options, allow_1d=False)
        if reason:
            return reason
        return only_2d(grid, "grid attention") or narrower(site, options["size"]) or fits(
            grid, options["size"], "grid") or SpatialPlan(
            options, grid=grid, prefix=prefix)

    def rewrite(self, graph: ir.Graph, site: AttentionSite, plan: SpatialPlan) -> ir.Value:
        from attnrewrite.passes.spatial import emit as E

        options, grid, prefix = plan.options, plan.grid, plan.prefix
        t = ir_tape.Tape(graph)
        return grid_last(t, site, lambda q, k, v, bias: E.emit_grid(
            t, q, k, v, scale=site.scale, bias=bias, grid=grid, prefix=prefix, size=options["size"],
            prefix_mode=options["prefix"]))

    def allowed(self, site: AttentionSite, plan: SpatialPlan):
        """bool [N, N] from the reference masks (see `WindowPass.allowed`)."""
        return in_token_order(site, R.allowed_grid(plan.grid, plan.prefix, plan.options["size"], plan.options["prefix"]))


class HaloPass(BasePass):
    name = "halo"
    exact = False
    description = "HaloNet blocked local attention: each BxB query block attends to its (B+2H)^2 neighbourhood"
    params = (
        Param("block", positive_int, 8, "query block side B"),
        Param("halo", non_negative_int, 3, "halo width H around each block"),
        Param("border", str, "mask", "mask: out-of-image keys are masked; zero: timm's zero-padded keys",
              choices=("mask", "zero")),
        PREFIX,
        KEEP_GLOBAL,
    )

    def applies(self, site: AttentionSite, options: dict) -> str | SpatialPlan:
        reason, grid, prefix = spatial_frame(site, options, allow_1d=False)
        if reason:
            return reason
        b = options["block"]  # a block larger than the grid is one block: allowed (the anchor)
        return only_2d(grid, "halo attention") or (narrower(site, (b, b)) if site.window else None) or SpatialPlan(
            options, grid=grid, prefix=prefix)

    def rewrite(self, graph: ir.Graph, site: AttentionSite, plan: SpatialPlan) -> ir.Value:
        from attnrewrite.passes.spatial import emit as E

        options, grid, prefix = plan.options, plan.grid, plan.prefix
        t = ir_tape.Tape(graph)
        return grid_last(t, site, lambda q, k, v, bias: E.emit_halo(
            t, q, k, v, scale=site.scale, bias=bias, grid=grid, prefix=prefix, block=options["block"],
            halo=options["halo"], border=options["border"], prefix_mode=options["prefix"]))

    def allowed(self, site: AttentionSite, plan: SpatialPlan):
        """bool [N, N]: the in-grid keys of each query's block neighbourhood (see `WindowPass.allowed`);
        with `border=zero` the zero-padded keys are counted by `zero_keys`."""
        o = plan.options
        return in_token_order(site, R.allowed_halo(plan.grid, plan.prefix, o["block"], o["halo"], o["border"], o["prefix"]))

    def zero_keys(self, site: AttentionSite, plan: SpatialPlan):
        """int [N] or None: per query, the zero keys timm's padding adds (logit 0, value 0), `border=zero`."""
        if plan.options["border"] != "zero":
            return None
        counts = R.halo_zero_keys(plan.grid, plan.prefix, plan.options["block"], plan.options["halo"])
        return np.diag(in_token_order(site, np.diag(counts)))


WINDOW = WindowPass("window")
BLOCK = WindowPass("block")
GRID = GridPass()
HALO = HaloPass()
