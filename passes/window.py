"""Window-family passes: `window` (Swin W-MSA / SW-MSA, `block` is the same), MaxViT `grid`, HaloNet `halo`.

All partition the token grid into fixed groups and attend inside each group, so the work is a few
Reshape/Transpose/Gather ops around one batched MatMul per group size. The math is defined once in
`spatial_reference.py` and the ONNX emission in `spatial_emit.py`; this file only decides where a
pass applies and with which settings.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes.spatial_common import (
    GLOBAL_TOKENS, KEEP_GLOBAL, PREFIX, fits, grid_last, narrower, sequence_prefix, spatial_frame,
)
from attnrewrite.registry import Param, non_negative_int, positive_int, register, size2d
from attnrewrite.site import AttentionSite


def _shift(site: AttentionSite, size: tuple[int, int], mode: str) -> tuple[int, int]:
    """Half-window shift for `half`, and for `alternate` on every odd site (Swin's SW-MSA blocks)."""
    half = (size[0] // 2, size[1] // 2)
    if mode == "half" or (mode == "alternate" and site.layer % 2 == 1):
        return half
    return (0, 0)


class WindowPass:
    exact = False
    description = "non-overlapping HxW windows over the token grid (Swin); shift=half|alternate for SW-MSA; 1-D sliding window for text"
    params = (
        Param("size", size2d, (7, 7), "window size N or HxW (tokens along the sequence for 1-D)"),
        Param("shift", str, "0", "0, half, or alternate (every other site shifted by half a window)",
              choices=("0", "half", "alternate")),
        PREFIX,
        GLOBAL_TOKENS,
        KEEP_GLOBAL,
    )

    def __init__(self, name: str = "window"):
        self.name = name

    def applies(self, site: AttentionSite, options: dict) -> str | None:
        reason, grid, _ = spatial_frame(site, options, allow_1d=True)
        if reason:
            return reason
        if grid is None:
            if options["size"][0] != options["size"][1] and options["size"][0] != 1:
                return "1-D sequences take a single window length (size=N)"
            return sequence_prefix(site, options)[0]
        return narrower(site, options["size"]) or fits(grid, options["size"], "window")

    def rewrite(self, graph: ir.Graph, site: AttentionSite, options: dict) -> ir.Value:
        from attnrewrite.passes import spatial_emit as E

        t = ir_tape.Tape(graph)
        _, grid, prefix = spatial_frame(site, options, allow_1d=True)
        size = options["size"]
        if grid is None:
            _, prefix = sequence_prefix(site, options)
            return E.emit_sliding_1d(t, site.q, site.k, site.v, scale=site.scale, bias=site.bias,
                                     window=max(size), mode="block", prefix=prefix, prefix_mode=options["prefix"],
                                     bias_per_key=site.bias_per_key)
        return grid_last(t, site, lambda q, k, v, bias: E.emit_window(
            t, q, k, v, scale=site.scale, bias=bias, grid=grid, prefix=prefix, size=size,
            shift=_shift(site, size, options["shift"]), prefix_mode=options["prefix"]))


class GridPass:
    name = "grid"
    exact = False
    description = "MaxViT grid attention: GxG groups of tokens strided across the whole grid"
    params = (Param("size", size2d, (7, 7), "grid G or GhxGw (tokens per group along each axis)"), PREFIX, KEEP_GLOBAL)

    def applies(self, site: AttentionSite, options: dict) -> str | None:
        reason, grid, _ = spatial_frame(site, options, allow_1d=False)
        if reason:
            return reason
        return narrower(site, options["size"]) or fits(grid, options["size"], "grid")

    def rewrite(self, graph: ir.Graph, site: AttentionSite, options: dict) -> ir.Value:
        from attnrewrite.passes import spatial_emit as E

        _, grid, prefix = spatial_frame(site, options, allow_1d=False)
        t = ir_tape.Tape(graph)
        return grid_last(t, site, lambda q, k, v, bias: E.emit_grid(
            t, q, k, v, scale=site.scale, bias=bias, grid=grid, prefix=prefix, size=options["size"],
            prefix_mode=options["prefix"]))


class HaloPass:
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

    def applies(self, site: AttentionSite, options: dict) -> str | None:
        reason, grid, _ = spatial_frame(site, options, allow_1d=False)
        if reason:
            return reason
        b = options["block"]  # a block larger than the grid is one block: allowed (the anchor)
        return narrower(site, (b, b)) if site.window else None

    def rewrite(self, graph: ir.Graph, site: AttentionSite, options: dict) -> ir.Value:
        from attnrewrite.passes import spatial_emit as E

        _, grid, prefix = spatial_frame(site, options, allow_1d=False)
        t = ir_tape.Tape(graph)
        return grid_last(t, site, lambda q, k, v, bias: E.emit_halo(
            t, q, k, v, scale=site.scale, bias=bias, grid=grid, prefix=prefix, block=options["block"],
            halo=options["halo"], border=options["border"], prefix_mode=options["prefix"]))


register(WindowPass("window"))
register(WindowPass("block"))
register(GridPass())
register(HaloPass())
