"""Neighborhood family: `neighborhood` (NATTEN) with `dilation` (DiNA).

Every grid query attends to exactly K×K grid tokens around it; near the border the window slides
inward instead of being zero-padded (NATTEN's clamp semantics, see ALGORITHMS.md §2). An undilated
kernel longer than its axis covers the axis (kernel 2·side−1 is full attention). The ONNX form
tiles the queries and gathers each tile's key region once, so the work is batched MatMuls with a
static mask carving each query's exact window.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes.spatial.common import (
    GLOBAL_TOKENS, KEEP_GLOBAL, LAYOUT, PREFIX, SpatialPlan, fits, grid_last, in_token_order, per_axis, sequence_prefix,
    spatial_frame,
)
from attnrewrite.passes.spatial import reference as R
from attnrewrite.registry import BasePass, Param, show_size, size2d
from attnrewrite.site import AttentionSite


class NeighborhoodPass(BasePass):
    name = "neighborhood"
    exact = False
    description = "NATTEN neighborhood attention: each token sees exactly KxK neighbours (clamped at borders); dilation=D for DiNA; 1-D for text"
    params = (
        Param("kernel", size2d, (7, 7), "kernel K, KhxKw or KfxKhxKw (tokens along the sequence for 1-D)", show=show_size),
        Param("dilation", size2d, (1, 1), "dilation D, DhxDw or DfxDhxDw", show=show_size),
        PREFIX,
        GLOBAL_TOKENS,
        LAYOUT,
        KEEP_GLOBAL,
    )

    def applies(self, site: AttentionSite, options: dict) -> str | SpatialPlan:
        reason, grid, prefix = spatial_frame(site, options, allow_1d=True)
        if reason:
            return reason
        if site.window is not None:
            return "already windowed; neighborhood attention applies to global sites"
        k, d = options["kernel"], options["dilation"]
        if grid is None:
            if d[0] != d[1] or k[0] != k[1]:
                return "a 1-D sequence takes one kernel and one dilation (kernel=K,dilation=D)"
            reason, prefix = sequence_prefix(site, options)
            if reason:
                return reason
            plan = SpatialPlan(options, grid=None, prefix=prefix)
            if site.q_len is None:
                return "dilation needs a static sequence length (export with a fixed length)" if d[1] != 1 else plan
            local = site.q_len - prefix
            k = effective_kernel(k, d, (local, local))
            if k[1] * d[1] > local:
                return f"kernel x dilation {k[1]}x{d[1]} is longer than the {local} local tokens"
            return plan
        (k, reason), (d, reason_d) = per_axis(k, grid, "kernel"), per_axis(d, grid, "dilation")
        if reason or reason_d:
            return reason or reason_d
        k = effective_kernel(k, d, grid)
        span = tuple(kk * dd for kk, dd in zip(k, d))
        return fits(grid, span, "kernel x dilation") or SpatialPlan(options, grid=grid, prefix=prefix)

    def rewrite(self, graph: ir.Graph, site: AttentionSite, plan: SpatialPlan) -> ir.Value:
        from attnrewrite.passes.spatial import emit as E

        t = ir_tape.Tape(graph)
        options, grid, prefix = plan.options, plan.grid, plan.prefix
        d = options["dilation"]
        if grid is None:
            local = site.q_len - prefix if site.q_len is not None else options["kernel"][1]
            k = effective_kernel(options["kernel"], d, (local, local))
            return E.emit_sliding_1d(t, site.q, site.k, site.v, scale=site.scale, bias=site.bias,
                                     window=k[1], mode="centered", dilation=d[1],
                                     prefix=prefix, prefix_mode=options["prefix"],
                                     bias_per_key=site.bias_per_key)
        kernel, d = per_axis(options["kernel"], grid, "kernel")[0], per_axis(d, grid, "dilation")[0]
        return grid_last(t, site, lambda q, k, v, bias: E.emit_neighborhood(
            t, q, k, v, scale=site.scale, bias=bias, grid=grid, prefix=prefix,
            kernel=effective_kernel(kernel, d, grid), dilation=d, prefix_mode=options["prefix"]))

    def allowed(self, site: AttentionSite, plan: SpatialPlan):
        """bool [N, N]: the keys each query sees, from the reference masks (the torch front-end's
        variant module; tested equal to what `rewrite` emits)."""
        options, grid, prefix = plan.options, plan.grid, plan.prefix
        d = options["dilation"]
        if grid is None:
            local = site.q_len - prefix
            k = effective_kernel(options["kernel"], d, (local, local))
            return R.allowed_sliding_1d(site.q_len, min(k[1], local // d[1]), prefix, "centered", options["prefix"], d[1])
        kernel, d = per_axis(options["kernel"], grid, "kernel")[0], per_axis(d, grid, "dilation")[0]
        kernel = effective_kernel(kernel, d, grid)
        if len(grid) == 3:
            return in_token_order(site, R.allowed_neighborhood_3d(grid, prefix, kernel, d, options["prefix"]))
        return in_token_order(site, R.allowed_neighborhood(grid, prefix, kernel, d, options["prefix"]))


def effective_kernel(kernel: tuple[int, ...], dilation: tuple[int, ...], sides: tuple[int, ...]) -> tuple[int, ...]:
    """An undilated kernel at least as long as its axis is that axis: every query sees all of it.

    So `kernel=2·side−1` (the kernel that covers the whole grid from any centre) is full attention,
    the exactness anchor, instead of an error. Dilated kernels must fit (k·d ≤ side, as in NATTEN):
    clamping them would change which tokens share a dilation group's window.
    """
    return tuple(min(k, n) if dd == 1 else k for k, dd, n in zip(kernel, dilation, sides))


NEIGHBORHOOD = NeighborhoodPass()
