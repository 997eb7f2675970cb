"""The one place that knows how a site's output layout relates to the `[B, h, Nq, dv]` view.

Detection records it (`SiteInfo.output_layout`); passes always produce `[B, h, Nq, dv]`; the
pipeline converts their result back to what the model's consumers read, and validation views the
original output the same way. Three layouts occur in exports: "bhnd" (already the view), "squeeze1"
(`[B·h, N, d]`, heads folded into the batch by older exporters) and "merge_heads" (`[B, N, h·d]`,
fused attention ops); "folded_qk" has Q·Kᵀ on folded heads but V and the output as `[B, h, N, d]`
(the dynamo exporter turns BLOOM's `bmm(probs.view(B·h, N, T), v)` into a 4-D MatMul), so the site
is viewed folded, `[B·h, 1, N, d]`, like "squeeze1"; Hiera's mask-unit attention adds "units" (`[B, h, U, N, d]`, viewed as
`[B·U, h, N, d]`: each unit is an instance).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape


def to_original_layout(graph: ir.Graph, layout: str, bhnd: ir.Value, original: ir.Value | None = None) -> ir.Value:
    """Convert a pass's `[B, h, Nq, dv]` result back to the layout the model consumed (`original`,
    the output it replaces, gives the unit count of the "units" layout)."""
    t = ir_tape.Tape(graph)
    if layout == "units":
        _, heads, units, tokens, dv = original.shape
        shape = ir.tensor(np.array([-1, units, heads, tokens, dv], np.int64))
        split = t.op("Reshape", [bhnd, t.op("Constant", [], attributes={"value": shape})])
        return t.op("Transpose", [split], attributes={"perm": [0, 2, 1, 3, 4]})
    if layout == "squeeze1":
        return t.op("Squeeze", [bhnd, t.op("Constant", [], attributes={"value": ir.tensor(np.array([1], np.int64))})])
    if layout == "folded_qk":
        _, heads, tokens, dv = original.shape
        shape = ir.tensor(np.array([-1, heads, tokens, dv], np.int64))
        return t.op("Reshape", [bhnd, t.op("Constant", [], attributes={"value": shape})])
    if layout == "merge_heads":
        merged = t.op("Transpose", [bhnd], attributes={"perm": [0, 2, 1, 3]})
        shape = ir.tensor(np.array([0, 0, -1], np.int64))
        return t.op("Reshape", [merged, t.op("Constant", [], attributes={"value": shape})])
    return bhnd


def heads_folded(layout: str) -> bool:
    """Is the site viewed as `[B·h, 1, N, d]` (heads folded into its instances)?"""
    return layout in ("squeeze1", "folded_qk")


def output_as_bhnd(layout: str, num_heads: int | None, out: np.ndarray) -> np.ndarray:
    """View an original attention output (as computed) as `[B, h, N, dv]`."""
    if layout == "squeeze1":
        return out[:, None]
    if layout == "folded_qk":
        return out.reshape(-1, 1, *out.shape[2:])
    if layout == "units":
        b, h, u, n, dv = out.shape
        return out.transpose(0, 2, 1, 3, 4).reshape(b * u, h, n, dv)
    if layout == "merge_heads":
        b, n, hd = out.shape
        return out.reshape(b, n, num_heads, hd // num_heads).transpose(0, 2, 1, 3)
    return out
