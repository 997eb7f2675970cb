"""One attention site alone as a model (Q, K, V and bias in, attention `[1, h, N, dv]` out).

The HTML report reads a rewrite's effective weights off it and `--pass auto` times each candidate on
it: the same `rewrite(graph, site, plan)` a pass applies inside the model, on a graph that holds
nothing else, with the site's own semantics (`site.info`) and fitted plan. The original is timed as
the exporter wrote it (`as_exported`): torch's SDPA export guards the probabilities with IsNaN + Where,
two more passes over the largest tensor of the site, and a canonical softmax attention would leave
that cost, which every rewrite removes, out of the comparison.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir import tape as ir_tape
from onnx_ir.convenience import get_const_tensor

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


def exported_inputs(site) -> list[ir.Value]:
    """What the site's own nodes read from the rest of the model (constants are copied, not read)."""
    inside = {id(o) for n in site.nodes for o in n.outputs}
    found: dict[int, ir.Value] = {}
    for node in site.nodes:
        for v in node.inputs:
            if v is not None and id(v) not in inside and get_const_tensor(v) is None:
                found.setdefault(id(v), v)
    return list(found.values())


def exported_name(value: ir.Value) -> str:
    """A site input's name in the lone model: apart from the canonical "q", "k", "v" and "bias"."""
    return f"exported/{value.name}"


def as_exported(model: ir.Model, site, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """The site's nodes as they are in the model (scale placement, mask, NaN guard, transposes), alone;
    its inputs are `exported_name(v)` for each of `exported_inputs`, of `shapes` by those names."""
    graph = ir.Graph([], [], nodes=[], opset_imports=dict(model.opset_imports), name="site")
    mapped: dict[int, ir.Value] = {}
    for v in exported_inputs(site):
        name = exported_name(v)
        fresh = ir.Value(name=name, shape=ir.Shape(list(shapes[name])), type=v.type)
        graph.inputs.append(fresh)
        mapped[id(v)] = fresh
    order = {id(n): i for i, n in enumerate(model.graph)}

    def read(v: ir.Value | None) -> ir.Value | None:
        if v is None or id(v) in mapped:
            return mapped.get(id(v)) if v is not None else None
        const = ir.Value(name=v.name, const_value=ir.tensor(get_const_tensor(v).numpy()))
        graph.register_initializer(const)
        mapped[id(v)] = const
        return const

    for node in sorted(site.nodes, key=lambda n: order[id(n)]):
        copy = ir.Node(node.domain, node.op_type, [read(v) for v in node.inputs], list(node.attributes.values()),
                       num_outputs=len(node.outputs), version=node.version, name=node.name)
        graph.append(copy)
        for old, new in zip(node.outputs, copy.outputs):
            new.name, new.type = old.name, old.type
            mapped[id(old)] = new
    out = mapped[id(site.output)]
    out.name = "out"
    graph.outputs.append(out)
    return ir.to_proto(ir.Model(graph, ir_version=model.ir_version))


def exports_alone(site) -> bool:
    """Whether the site's own nodes compute its output (a site found without them cannot be cut out)."""
    return any(o is site.output for n in site.nodes for o in n.outputs)


def original(model: ir.Model, site, shapes) -> onnx.ModelProto:
    """softmax(scale·QKᵀ + bias)·V as plain ops: what the site costs before any rewrite, where the
    site's own nodes cannot be cut out (`exports_alone`)."""
    return site_model(model, site, shapes, lambda graph, lone: softmax_attention(
        ir_tape.Tape(graph), lone.q, lone.k, lone.v, site.scale, lone.bias, np.float32))


def site_activations(model: ir.Model, base_dir, sites, batch: dict[str, np.ndarray], roles=("q", "k", "v"),
                     exported: bool = False) -> dict[str, np.ndarray]:
    """The sites' Q/K/V (the `roles` asked for) and bias on the first sample of `batch`, by value name;
    with `exported`, also what their own nodes read (`exported_inputs`)."""
    from attnrewrite.validate.runner import make_session, run_batches

    names = []
    for s in sites:
        names += [getattr(s, role).name for role in roles] + ([s.bias.name] if s.bias is not None else [])
        names += [v.name for v in exported_inputs(s)] if exported else []
    names = list(dict.fromkeys(names))
    first = {name: value[:1] for name, value in batch.items()}
    return run_batches(make_session(model, base_dir, names), [first], names)


def random_feeds(shapes: dict[str, tuple[int, ...]], seed: int = 0,
                 dtypes: dict[str, np.dtype] | None = None) -> dict[str, np.ndarray]:
    """Timing inputs (the values do not change a site's cost): float32 unless `dtypes` says otherwise;
    a bias, and any input that is not floating point, is zero."""
    rng = np.random.default_rng(seed)
    dtypes = dtypes or {}

    def feed(name: str, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(dtypes.get(name, np.float32))
        if name == "bias" or not np.issubdtype(dtype, np.floating):
            return np.zeros(shape, dtype)
        return rng.standard_normal(shape).astype(dtype)

    return {name: feed(name, shape) for name, shape in shapes.items()}
