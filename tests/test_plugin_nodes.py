"""`--target tensorrt` plugin nodes: their attributes drive the kernels to what their ONNX bodies compute.

Each case plans one site with a real pass, emits it as a plugin node (`onnx_nodes.emit_plugin`), runs the
node's ONNX body in onnxruntime (which inlines the per-site local function), and runs the kernel the
node names with the node's own fields under Triton's interpreter: the attributes are proven to mean
what the body computes. The spatial nodes are also launched through the TensorRT entry points
(argument order, int32 scalars, compiled-in scale), exactly as the AOT plugin launches them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from attnrewrite.plugins import onnx_nodes
from attnrewrite.plugins.catalog import PLUGIN_DOMAIN, PLUGIN_NAMESPACE
from attnrewrite.registry import parse_pass
from attnrewrite.synthetic import lone_site

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

SCALE = 0.25


def _arrays(shape, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(shape) * 1.5
    k = rng.standard_normal(shape) + rng.standard_normal((1, shape[1], 1, shape[3]))  # offset: K smoothing matters
    v = rng.standard_normal(shape) + 0.5
    return [x.astype(np.float32) for x in (q, k, v)]


def _plugin_model(spec_text, shape, *, grid=None, prefix=None, seed=0):
    """(model with one plugin node as its output, the node, q/k/v arrays)."""
    graph, site = lone_site(*shape, scale=SCALE, grid=grid, prefix=prefix)
    spec = parse_pass(spec_text)
    plan = spec.applies(site)
    assert not isinstance(plan, str), plan
    arrays = _arrays(shape, seed)
    if plan.needs_fit:
        plan = spec.impl.fit(site, dict(zip("qkv", arrays)), plan)
    call = onnx_nodes.plugin_call(spec.name, site, plan)
    assert not isinstance(call, str), call
    model = ir.Model(graph, ir_version=10)
    out = onnx_nodes.emit_plugin(model, site, plan, call, spec.impl.rewrite)
    out.name = "out"
    graph.outputs.append(out)
    return model, onnx_nodes.plugin_nodes(model)[0], arrays


def _run_body(model, arrays):
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip("qkv", arrays)))[0]


def _run_kernel(node, arrays, **changes):
    from attnrewrite.plugins.launch import run_plugin

    fields = {**onnx_nodes.node_fields(node), **changes}
    return run_plugin(node.op_type, fields, *(torch.from_numpy(x) for x in arrays)).numpy()


SPATIAL = [
    ("window:size=4x4", (1, 2, 43, 16), (6, 7), 1),
    ("window:size=4x4,shift=half", (2, 2, 65, 16), (8, 8), 1),
    ("window:size=3x5,shift=half", (1, 2, 48, 8), (6, 8), 0),
    ("window:size=6x6", (1, 2, 37, 16), (6, 6), 1),  # one window covers the grid: the exactness anchor
    ("window:size=8", (1, 2, 40, 16), None, None),  # 1-D text: blocks of 8 tokens, [CLS] global
    ("neighborhood:kernel=3", (1, 2, 43, 16), (6, 7), 1),
    ("neighborhood:kernel=3,dilation=2", (1, 2, 65, 16), (8, 8), 1),
    ("neighborhood:kernel=5x3,dilation=1x2", (1, 2, 70, 8), (7, 10), 0),
    ("neighborhood:kernel=5", (1, 2, 40, 16), None, None),
    ("neighborhood:kernel=3,dilation=2", (1, 2, 41, 16), None, None),
    ("paro:density=0.5,block=16,bits=16", (1, 2, 65, 16), (8, 8), 1),
    ("paro:density=1,block=16,bits=16", (1, 2, 65, 16), (8, 8), 1),  # density 1: dense attention
]


@pytest.mark.parametrize("spec,shape,grid,prefix", SPATIAL, ids=[f"{s}-{g}" for s, _, g, _ in SPATIAL])
def test_float_plugin_node_equals_its_body(spec, shape, grid, prefix):
    model, node, arrays = _plugin_model(spec, shape, grid=grid, prefix=prefix)
    body = _run_body(model, arrays)
    got = _run_kernel(node, arrays)
    assert np.abs(got - body).max() < 1e-5, f"{spec}: kernel vs body max error {np.abs(got - body).max():.3g}"
    if node.op_type != "BlockSparseAttention":
        from attnrewrite.plugins.launch import run_trt_entry

        trt = run_trt_entry(node.op_type, onnx_nodes.node_fields(node), *(torch.from_numpy(x) for x in arrays))
        assert np.abs(trt.numpy() - body).max() < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_block_sparse_node_stays_within_its_quantisation_error(bits):
    model, node, arrays = _plugin_model(f"paro:density=0.5,block=32,bits={bits}", (1, 2, 129, 16), grid=(8, 16), prefix=1)
    body = _run_body(model, arrays)
    got = _run_kernel(node, arrays)
    exact = _run_kernel(node, arrays, qk_bits=16, pv_bits=16, smooth_k=0)  # the same tables in float
    body_error, kernel_error = np.abs(body - exact).max(), np.abs(got - exact).max()
    assert body_error > 1e-4  # quantisation is really on in both
    assert np.abs(got - body).max() <= 2 * body_error, (body_error, kernel_error)
    if bits == 4:  # the kernel's P·V is int8, the body's int4: the kernel is closer to float
        assert kernel_error <= body_error
        assert node.attributes["pv_bits"].value == 8


def test_plugin_node_is_what_tensorrts_parser_reads():
    model, node, _ = _plugin_model("window:size=4x4,shift=half", (1, 2, 65, 16), grid=(8, 8), prefix=1)
    assert node.domain == PLUGIN_DOMAIN and node.op_type == "WindowAttention" and node.overload == "attn_0"
    assert node.attributes["plugin_namespace"].value == PLUGIN_NAMESPACE
    assert node.attributes["plugin_version"].value == "1"
    assert node.attributes["aot"].value == 1
    assert list(node.attributes["grid"].value) == [8, 8] and list(node.attributes["shift"].value) == [2, 2]
    assert node.op_type not in {s.name for s in onnx.defs.get_all_schemas()}  # never an ONNX operator name
    function = model.functions[(PLUGIN_DOMAIN, "WindowAttention", "attn_0")]
    assert not any(n.op_type == "Constant" and n.domain == PLUGIN_DOMAIN for n in function)
    assert len(model.graph.initializers) == 0  # tables live inside the body, as Constant nodes


def test_strip_bodies_leaves_plugin_nodes_only():
    model, node, _ = _plugin_model("neighborhood:kernel=3,dilation=2", (1, 2, 65, 16), grid=(8, 8), prefix=1)
    assert onnx_nodes.strip_bodies(model) == 1
    assert not model.functions
    assert node.domain == PLUGIN_NAMESPACE and node.overload == ""
    assert set(onnx_nodes.node_fields(node)) == set(onnx_nodes.FIELDS["NeighborhoodAttention"])
    assert PLUGIN_DOMAIN not in model.opset_imports and model.opset_imports[PLUGIN_NAMESPACE] == 1
    onnx.checker.check_model(ir.to_proto(model))


def test_strip_bodies_refuses_a_node_missing_a_field():
    model, node, _ = _plugin_model("window:size=4x4", (1, 2, 43, 16), grid=(6, 7), prefix=1)
    del node.attributes["window"]
    with pytest.raises(ValueError, match="lacks window"):
        onnx_nodes.strip_bodies(model)


REFUSED = [
    ("window:size=2x2x2", (1, 2, 64, 8), (4, 4, 4), 0, "not a 3-D grid"),
    ("window:size=4x4,prefix=local", (1, 2, 43, 16), (6, 7), 1, "prefix=local"),
    ("paro:density=0.5,block=8,bits=16", (1, 2, 65, 16), (8, 8), 1, "power of two >= 16"),
    ("paro:density=0.5,block=16,bits=8", (1, 2, 65, 16), (8, 8), 1, ">= 32 keys"),
    ("linear", (1, 2, 43, 16), (6, 7), 1, "no fused kernel"),
]


@pytest.mark.parametrize("spec,shape,grid,prefix,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_sites_without_a_kernel_say_why(spec, shape, grid, prefix, reason):
    graph, site = lone_site(*shape, scale=SCALE, grid=grid, prefix=prefix)
    parsed = parse_pass(spec)
    plan = parsed.applies(site)
    assert not isinstance(plan, str), plan
    if plan.needs_fit:
        plan = parsed.impl.fit(site, dict(zip("qkv", _arrays(shape))), plan)
    call = onnx_nodes.plugin_call(parsed.name, site, plan)
    assert isinstance(call, str) and reason in call


def test_biased_sites_stay_plain_onnx():
    graph, site = lone_site(1, 2, 43, 16, scale=SCALE, grid=(6, 7), prefix=1, bias_dims=[1, 1, 1, 43])
    spec = parse_pass("window:size=4x4")
    call = onnx_nodes.plugin_call(spec.name, site, spec.applies(site))
    assert isinstance(call, str) and "bias" in call


def _body_model(model: ir.Model, node: ir.Node, dims: list[int]) -> ir.Model:
    """A model that calls one plugin node's local function on fresh `q, k, v` inputs of `dims`."""
    f32 = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([ir.Value(name=n, shape=ir.Shape(dims), type=f32) for n in "qkv"], [], nodes=[],
                     opset_imports=dict(model.opset_imports), name="plugin_body")
    out = ir.Value(name="out", shape=ir.Shape(dims), type=f32)
    graph.append(ir.Node(node.domain, node.op_type, list(graph.inputs), [], overload=node.overload, outputs=[out]))
    graph.outputs.append(out)
    wrapper = ir.Model(graph, ir_version=10)
    function = model.functions[(node.domain, node.op_type, node.overload)]
    wrapper.functions[function.identifier()] = function
    return wrapper


@pytest.mark.parametrize("spec", ["window:size=4x4,shift=half", "neighborhood:kernel=3,dilation=2"])
def test_plugin_nodes_on_a_real_export_equal_their_bodies(capsys, tmp_path, export, spec):
    """DINOv2 with 4 register tokens, exported by torch.onnx (dynamo, opset 23): 5 prefix tokens."""
    from attnrewrite.cli import main

    out = tmp_path / "t.onnx"
    assert main([str(export("dinov2_reg4", "dynamo23")), "--pass", spec, "--target", "tensorrt", "-o", str(out)]) == 0
    capsys.readouterr()
    model = ir.load(out)
    nodes = onnx_nodes.plugin_nodes(model)
    assert nodes and all(onnx_nodes.node_fields(n)["prefix"] == 5 for n in nodes)
    for node in nodes:
        dims = [d if isinstance(d, int) else 1 for d in node.inputs[0].shape]
        arrays = _arrays(dims)
        body = _run_body(_body_model(model, node, dims), arrays)
        assert np.abs(_run_kernel(node, arrays) - body).max() < 1e-5, node.name
