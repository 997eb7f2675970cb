"""One attention site alone as a model (Q, K, V and bias in, attention `[1, h, N, dv]` out).

The HTML report reads a rewrite's effective weights off it and `--pass auto` times each candidate on
it: the same `rewrite(graph, site, plan)` a pass applies inside the model, on a graph that holds
nothing else, with the site's own semantics (`site.info`) and fitted plan.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes.ops import softmax_attention


def site_model(model: ir.Model, site, shapes: dict[str, tuple[int, ...]], emit) -> onnx.ModelProto:
    """`emit(graph, lone_site) -> ir.Value` on fresh float inputs of `shapes` ("q", "k", "v"[, "bias"])."""
    from attnrewrite.site import AttentionSite

    dtype = ir.TensorType(ir.DataType.FLOAT)
    values = {name: ir.Value(name=name, shape=ir.Shape(list(shape)), type=dtype) for name, shape in shapes.items()}
    graph = ir.Graph(list(values.values()), [], nodes=[], opset_imports=dict(model.opset_imports), name="site")
    lone = AttentionSite(id=site.id, info=site.info, anchor=None, q=values["q"], k=values["k"], v=values["v"],
                         output=None, bias=values.get("bias"), nodes=())
    out = emit(graph, lone)
    out.name = "out"
    graph.outputs.append(out)
    return ir.to_proto(ir.Model(graph, ir_version=model.ir_version))


def rewritten(model: ir.Model, spec, site, plan, shapes) -> onnx.ModelProto:
    """The pass's rewrite of `site` with `plan`, alone."""
    return site_model(model, site, shapes, lambda graph, lone: spec.impl.rewrite(graph, lone, plan))


def original(model: ir.Model, site, shapes) -> onnx.ModelProto:
    """softmax(scale·QKᵀ + bias)·V as plain ops: what the site costs before any rewrite."""
    return site_model(model, site, shapes, lambda graph, lone: softmax_attention(
        ir_tape.Tape(graph), lone.q, lone.k, lone.v, site.scale, lone.bias, np.float32))


def site_activations(model: ir.Model, base_dir, sites, batch: dict[str, np.ndarray], roles=("q", "k", "v")
                     ) -> dict[str, np.ndarray]:
    """The sites' Q/K/V (the `roles` asked for) and bias on the first sample of `batch`, by value name."""
    from attnrewrite.validate.runner import make_session, run_batches

    names = []
    for s in sites:
        names += [getattr(s, role).name for role in roles] + ([s.bias.name] if s.bias is not None else [])
    names = list(dict.fromkeys(names))
    first = {name: value[:1] for name, value in batch.items()}
    return run_batches(make_session(model, base_dir, names), [first], names)


def random_feeds(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Timing inputs (the values do not change a site's cost); a bias is zero."""
    rng = np.random.default_rng(seed)
    return {name: (np.zeros(shape, np.float32) if name == "bias" else rng.standard_normal(shape).astype(np.float32))
            for name, shape in shapes.items()}
