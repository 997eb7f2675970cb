"""`--target tensorrt`: each rewritten site becomes one plugin node with its ONNX body beside it.

A site whose pass has a fused kernel (`catalog.KERNELS`) is emitted as a single node
`attnrewrite.trt::WindowAttention` (etc.) reading the site's `[B, h, N, d]` Q/K/V, carrying the kernel's
parameters as attributes the way TensorRT's ONNX parser hands them to a plugin (op_type = plugin name,
`plugin_namespace`, `plugin_version`, everything else a plugin field; ALGORITHMS.md §8). The pass's
ordinary ONNX rewrite of that site becomes a model-local function of the same name (one overload per
site, since the constants differ), so onnxruntime inlines it and the pipeline validates exactly what it
validates for the plain rewrite; `attnrewrite build` strips the bodies so the parser finds the plugin.

Sites a kernel cannot run (3-D grids, biases, tokens after the grid, INT4 P·V, …) keep the plain ONNX
rewrite, and the report says why. Imports onnx_ir only: no triton, torch or tensorrt here.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from attnrewrite.plugins.catalog import PLUGIN_DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, by_plugin
from attnrewrite.registry import Plan
from attnrewrite.site import AttentionSite

#: plugins whose TensorRT implementation is ahead-of-time PTX (one kernel); the rest run the JIT impl
AOT_PLUGINS = ("WindowAttention", "NeighborhoodAttention")


@dataclasses.dataclass(frozen=True)
class PluginCall:
    """What one plugin node computes: the plugin and its fields (ints, int lists, floats)."""

    plugin: str
    fields: dict[str, int | float | tuple[int, ...]]

    def attributes(self) -> list[ir.Attr]:
        attrs = [ir.AttrString("plugin_namespace", PLUGIN_NAMESPACE), ir.AttrString("plugin_version", PLUGIN_VERSION)]
        if self.plugin in AOT_PLUGINS:
            attrs.append(ir.AttrInt64("aot", 1))  # the parser's switch for a plugin's AOT implementation
        for name, value in self.fields.items():
            if isinstance(value, float):
                attrs.append(ir.AttrFloat32(name, value))
            elif isinstance(value, tuple):
                attrs.append(ir.AttrInt64s(name, [int(x) for x in value]))
            else:
                attrs.append(ir.AttrInt64(name, int(value)))
        return attrs


def plugin_call(pass_name: str, site: AttentionSite, plan: Plan) -> PluginCall | str:
    """The plugin node for this site's rewrite, or why the kernels cannot run it (a sentence)."""
    plugin = next((p for p, ks in by_plugin().items() if any(pass_name in k.passes for k in ks)), None)
    if plugin is None:
        return f"no fused kernel for the {pass_name} pass"
    shapes = [x.shape for x in (site.q, site.k, site.v)]
    if any(s is None or len(s) != 4 or not all(isinstance(d, int) for d in s[1:]) for s in shapes):
        return "the kernels need Q/K/V as [B, heads, N, d] with static heads, tokens and head dim"
    if not shapes[0] == shapes[1] == shapes[2]:
        return "the kernels need Q, K and V of one shape (self-attention, equal head dims)"
    if site.bias is not None:
        return f"the kernels take no additive bias (this site has a {site.bias_kind} bias)"
    if plugin == "BlockSparseAttention":
        return _block_sparse(plan, site)
    if plan.options.get("prefix") != "global":
        return "the kernels keep prefix tokens global (prefix=local has no kernel)"
    if site.suffix_tokens:
        return "tokens after the grid have no kernel layout"
    grid = plan.grid
    if grid is not None and len(grid) != 2:
        return f"the kernels cover 2-D grids and 1-D sequences, not a {len(grid)}-D grid"
    if plugin == "WindowAttention":
        return _window(site, plan)
    return _neighborhood(site, plan)


def _window(site: AttentionSite, plan: Plan) -> PluginCall:
    from attnrewrite.passes.spatial.common import per_axis
    from attnrewrite.passes.window import _shift

    size = plan.options["size"]
    if plan.grid is None:  # 1-D: non-overlapping blocks of `size` tokens = one row of windows
        grid, size, shift = (1, site.q_len - plan.prefix), (1, max(size)), (0, 0)
    else:
        grid, size = plan.grid, per_axis(size, plan.grid, "size")[0]
        shift = _shift(site, size, plan.options["shift"])
    return PluginCall("WindowAttention", {"grid": tuple(grid), "prefix": plan.prefix, "window": tuple(size),
                                          "shift": tuple(shift), "scale": float(site.scale)})


def _neighborhood(site: AttentionSite, plan: Plan) -> PluginCall:
    from attnrewrite.passes.neighborhood import effective_kernel
    from attnrewrite.passes.spatial.common import per_axis

    kernel, dilation = plan.options["kernel"], plan.options["dilation"]
    if plan.grid is None:
        local = site.q_len - plan.prefix
        grid = (1, local)
        kernel = (1, effective_kernel(kernel, dilation, (local, local))[1])
        dilation = (1, dilation[1])
    else:
        grid = plan.grid
        kernel, dilation = per_axis(kernel, grid, "kernel")[0], per_axis(dilation, grid, "dilation")[0]
        kernel = effective_kernel(kernel, dilation, grid)
    return PluginCall("NeighborhoodAttention", {"grid": tuple(grid), "prefix": plan.prefix, "kernel": tuple(kernel),
                                                "dilation": tuple(dilation), "scale": float(site.scale)})


def _block_sparse(plan: Plan, site: AttentionSite) -> PluginCall | str:
    from attnrewrite.plugins.tables import BlockTables

    bits, block = plan.options["bits"], plan.block
    if block < 16 or block & (block - 1):
        return f"block {block} is not a power of two >= 16, which the block-sparse kernel tiles by"
    if bits != 16 and block < 32:
        return f"int8 P·V reduces over >= 32 keys; block {block} is too small"
    tables = BlockTables.from_paro(plan.frame, plan.tables)
    glob = list(plan.frame.global_idx)
    prefix = sum(1 for g in glob if g < min(plan.frame.blocked))
    return PluginCall("BlockSparseAttention", {
        "order": tuple(tables.order.ravel()), "blocks": tuple(tables.blocks.ravel()), "block": block,
        "kept": int(tables.blocks.shape[2]), "global_prefix": prefix, "global_suffix": len(glob) - prefix,
        "qk_bits": bits, "pv_bits": 16 if bits == 16 else 8, "smooth_k": int(bool(plan.options["smooth_k"]) and bits != 16),
        "scale": float(site.scale)})


def plugin_note(call: PluginCall) -> str:
    """What the report says about a site emitted as a plugin node."""
    if call.plugin == "BlockSparseAttention" and call.fields["qk_bits"] == 4:
        return (f"{call.plugin} plugin (P·V in int8 on the GPU: no int4 dot; the ONNX body, which onnxruntime "
                "runs, quantises P·V to int4)")
    return f"{call.plugin} plugin"


# --- emission ----------------------------------------------------------------------------------


def emit_plugin(model: ir.Model, site: AttentionSite, plan: Plan, call: PluginCall, rewrite) -> ir.Value:
    """Append the plugin node for `site` to the model's graph and register its body as a local function.

    `rewrite(graph, site, plan)` is the pass's own emission; it runs on a scratch graph whose inputs
    stand in for the site's Q/K/V, so the body is exactly the plain rewrite of this site."""
    inner = [ir.Value(name=f"{n}", shape=x.shape, type=x.type) for n, x in zip("qkv", (site.q, site.k, site.v))]
    scratch = ir.Graph(inner, [], nodes=[], opset_imports=dict(model.graph.opset_imports), name=site.id)
    out = rewrite(scratch, dataclasses.replace(site, q=inner[0], k=inner[1], v=inner[2]), plan)
    body = _constants_inline(scratch)
    out.name = "out"
    body.outputs.append(out)
    overload = site.id
    domains = {n.domain for n in body if n.domain}
    function = ir.Function(PLUGIN_DOMAIN, call.plugin, overload, graph=body, attributes=[])
    for domain in domains:
        function.opset_imports.setdefault(domain, model.opset_imports.get(domain, 1))
    model.functions[function.identifier()] = function
    model.opset_imports.setdefault(PLUGIN_DOMAIN, 1)
    result = ir.Value(shape=site.q.shape, type=site.q.type)
    node = ir.Node(PLUGIN_DOMAIN, call.plugin, [site.q, site.k, site.v], call.attributes(), overload=overload,
                   outputs=[result])
    model.graph.append(node)
    return result


def _constants_inline(graph: ir.Graph) -> ir.Graph:
    """The scratch graph with its initializers turned into Constant nodes (functions hold no initializers)."""
    first = next(iter(graph), None)
    for name, value in list(graph.initializers.items()):
        node = ir.Node("", "Constant", [], [ir.AttrTensor("value", value.const_value)], num_outputs=1)
        node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type = name, value.shape, value.type
        graph.initializers.pop(name)
        value.replace_all_uses_with(node.outputs[0])
        if first is None:
            graph.append(node)
        else:
            graph.insert_before(first, node)
    return graph


def unused_functions(model: ir.Model) -> list[ir.OperatorIdentifier]:
    """Plugin bodies no node calls any more (sites switched back by `--fallback`)."""
    called = {(n.domain, n.op_type, n.overload) for n in model.graph}
    return [key for key in model.functions if key[0] == PLUGIN_DOMAIN and key not in called]



# --- what TensorRT's parser sees -------------------------------------------------------------------

#: the fields each plugin reads (`tensorrt.register_plugins` declares the same names)
FIELDS = {
    "WindowAttention": ("grid", "prefix", "window", "shift", "scale"),
    "NeighborhoodAttention": ("grid", "prefix", "kernel", "dilation", "scale"),
    "BlockSparseAttention": ("order", "blocks", "block", "kept", "global_prefix", "global_suffix", "qk_bits",
                             "pv_bits", "smooth_k", "scale"),
}
_PARSER_ATTRIBUTES = ("plugin_namespace", "plugin_version", "aot")


def plugin_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.domain in (PLUGIN_DOMAIN, PLUGIN_NAMESPACE) and n.op_type in FIELDS]


def node_fields(node: ir.Node) -> dict:
    """A plugin node's fields as the plugin receives them (parser attributes left out)."""
    return {name: attr.value if not isinstance(attr.value, (list, tuple)) else tuple(attr.value)
            for name, attr in node.attributes.items() if name not in _PARSER_ATTRIBUTES}


def strip_bodies(model: ir.Model) -> int:
    """Make `model` the graph TensorRT must parse: plugin nodes without their ONNX bodies.

    A model-local function named like the node shadows the plugin in TensorRT's parser (§8), so the
    bodies go; the nodes move to the plugin namespace as their domain, which TensorRT ≥ 10.10 also
    reads as the namespace, so domain and `plugin_namespace` agree. Returns the number of plugin nodes."""
    nodes = plugin_nodes(model)
    for node in nodes:
        missing = [f for f in FIELDS[node.op_type] if f not in node.attributes]
        if missing or node.attributes.get("plugin_namespace") is None:
            raise ValueError(f"plugin node {node.name} ({node.op_type}) lacks {', '.join(missing) or 'plugin_namespace'}")
        node.domain = PLUGIN_NAMESPACE
        node.overload = ""
    for key in [k for k in model.functions if k[0] == PLUGIN_DOMAIN]:
        del model.functions[key]
    model.opset_imports.pop(PLUGIN_DOMAIN, None)
    if nodes:
        model.opset_imports[PLUGIN_NAMESPACE] = 1
    return len(nodes)
