"""`quant` and `paro` subgraphs vs their numpy references (passes/quantize.py, passes/paro.py), in ORT.

Each test builds a one-site graph (inputs Q, K, V [, key-padding bias]), lets the pass plan, fit and
rewrite it as the pipeline would, and compares with the reference: the integer parts (quantised Q/K,
Q·Kᵀ, P·V) bit for bit, the outputs to float tolerance; plus the exactness anchors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from attnrewrite.passes import paro as PR
from attnrewrite.passes import quantize as Qz
from attnrewrite.registry import parse_pass
from attnrewrite.site import AttentionSite
from attnrewrite.synthetic import lone_site
from tests.conftest import ort_run

SCALE = 0.35


def _arrays(rng, b, h, n, d, dyadic=False):
    if dyadic:  # multiples of 1/8: token means are exact in any summation order (bit-exact K smoothing)
        return {name: (rng.integers(-24, 25, (b, h, n, d)) / 8).astype(np.float32) for name in "qkv"}
    q = rng.standard_normal((b, h, n, d)) * 2
    k = rng.standard_normal((b, h, n, d)) + rng.standard_normal((1, h, 1, d)) * 3  # a shared offset K smoothing removes
    v = rng.standard_normal((b, h, n, d)) + 1.5
    return {"q": q.astype(np.float32), "k": k.astype(np.float32), "v": v.astype(np.float32)}


def _site(b, h, n, d, *, bias=False, grid=None, prefix=None, suffix=0, bias_dims=None):
    return lone_site(b, h, n, d, scale=SCALE, grid=grid, prefix=prefix, suffix=suffix,
                     bias_dims=(bias_dims or [b, 1, 1, n]) if bias else None)


def _rewrite(spec_text, arrays, *, bias=None, grid=None, prefix=None, suffix=0, calib=None, expose=(), bias_dims=None):
    """Plan/fit/rewrite one site; returns (outputs by name, plan). `expose` adds intermediate values
    (by op type of their producer) as outputs, in graph order."""
    b, h, n, d = arrays["q"].shape
    graph, site = _site(b, h, n, d, bias=bias is not None, grid=grid, prefix=prefix, suffix=suffix, bias_dims=bias_dims)
    spec = parse_pass(spec_text)
    plan = spec.applies(site)
    assert not isinstance(plan, str), plan
    if plan.needs_fit:
        acts = dict(calib or arrays)
        if bias is not None:
            acts["bias"] = bias
        plan = spec.impl.fit(site, acts, plan)
    out = spec.impl.rewrite(graph, site, plan)
    out.name, out.type = "out", ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(out)
    names = ["out"]
    for node in list(graph):
        if node.op_type in expose:
            node.outputs[0].name = f"{node.op_type}_{len(names)}"
            dtype = {"Cast": lambda: ir.DataType(node.attributes["to"].value), "QuantizeLinear": lambda: ir.DataType.UINT8}
            node.outputs[0].type = ir.TensorType(dtype.get(node.op_type, lambda: ir.DataType.FLOAT)())
            graph.outputs.append(node.outputs[0])
            names.append(node.outputs[0].name)
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    feeds = dict(arrays)
    if bias is not None:
        feeds["bias"] = bias
    return ort_run(proto, feeds), plan


def _cfg(bits=8, gran="token", smooth_k=True, smooth_v=False, qk=True, pv=True, p_scale="row"):
    fmt = Qz.FORMATS[bits]
    return Qz.QuantConfig(qk=fmt if qk else None, pv=fmt if pv else None, smooth_k=smooth_k, smooth_v=smooth_v,
                          granularity=gran, p_scale=p_scale)


@pytest.mark.parametrize("gran", ["tensor", "head", "token", "block:4", "block:5"])
@pytest.mark.parametrize("smooth_k", [False, True])
def test_int8_integer_parts_bit_exact(gran, smooth_k):
    """Quantised Q and K, and the int32 Q·Kᵀ recovered from the fused dequantisation, equal numpy's."""
    arrays = _arrays(np.random.default_rng(3), 2, 3, 12, 8, dyadic=smooth_k)
    got, _ = _rewrite(f"quant:granularity={gran},smooth_k={str(smooth_k).lower()}", arrays, expose=("Cast",))
    ref = Qz.quant_attention_reference(arrays["q"], arrays["k"], arrays["v"], scale=SCALE,
                                       cfg=_cfg(gran=gran, smooth_k=smooth_k))
    casts = [v for name, v in got.items() if name.startswith("Cast")]
    q_u8 = next(c for c in casts if c.dtype == np.uint8)
    k_i8, v_i8 = (c for c in casts if c.dtype == np.int8)
    np.testing.assert_array_equal(q_u8.astype(np.int32) - Qz.Q_ZERO_POINT, ref["q_int"].astype(np.int32))
    np.testing.assert_array_equal(k_i8, ref["k_int"].astype(np.int8))
    np.testing.assert_array_equal(v_i8, ref["v_int"].astype(np.int8))
    assert np.abs(q_u8.astype(np.int32) - 64).max() <= 63  # the 7-bit side that keeps AVX2 kernels exact
    # the integer product, recovered from the fused kernel's float logits and the reference scales
    got_int = _logits_of(arrays, f"quant:granularity={gran},smooth_k={str(smooth_k).lower()}")
    row = ref["scales"]["q"].astype(np.float64) * SCALE
    recovered = got_int / (row * np.swapaxes(ref["scales"]["k"], -1, -2))
    np.testing.assert_array_equal(np.rint(recovered), ref["logits_int"])
    assert np.abs(recovered - ref["logits_int"]).max() < 1e-2
    np.testing.assert_allclose(got["out"], ref["output"], atol=2e-5, rtol=1e-4)


def _logits_of(arrays, spec_text):
    got, _ = _rewrite(spec_text, arrays, expose=("MatMulIntegerToFloat",))
    n = arrays["k"].shape[2]
    return next(v for name, v in got.items() if name.startswith("MatMulIntegerToFloat") and v.shape[-1] == n).astype(np.float64)


def test_int8_pv_integer_part_bit_exact():
    """P·V: the graph's uint8 P times its int8 V equals the kernel's int32 result (then ×scale/127)."""
    arrays = _arrays(np.random.default_rng(4), 1, 2, 16, 8)
    got, _ = _rewrite("int8", arrays, expose=("QuantizeLinear", "Cast", "MatMulIntegerToFloat"))
    p_u8 = next(v for n, v in got.items() if n.startswith("QuantizeLinear"))
    v_i8 = [v for n, v in got.items() if n.startswith("Cast") and v.dtype == np.int8][-1]
    pv = next(v for n, v in got.items() if n.startswith("MatMulIntegerToFloat") and v.shape[-1] == 8)
    assert (p_u8.max(axis=-1) == 127).all()  # P̃ = P / rowmax: each row's largest weight uses the full range
    ref = Qz.quant_attention_reference(arrays["q"], arrays["k"], arrays["v"], scale=SCALE, cfg=_cfg())
    p_u8 = p_u8.reshape(*v_i8.shape[:3], -1)  # quantised per row as [rows, keys]
    ints = p_u8.astype(np.int64) @ v_i8.astype(np.int64)
    np.testing.assert_allclose(pv, ints * (ref["scales"]["v"] / 127), rtol=1e-6)


def test_int8_keeps_diffuse_long_rows():
    """1024 keys with near-uniform attention: every normalised weight is below 1/(2·127), so quantising P
    itself would round them all to zero; P̃ keeps the output within INT8 error."""
    rng = np.random.default_rng(14)
    arrays = {"q": (rng.standard_normal((1, 2, 1024, 16)) * 0.1).astype(np.float32),
              "k": rng.standard_normal((1, 2, 1024, 16)).astype(np.float32),
              "v": (rng.standard_normal((1, 2, 1024, 16)) + 1).astype(np.float32)}
    exact = Qz.quant_attention_reference(arrays["q"], arrays["k"], arrays["v"], scale=SCALE, cfg=_cfg(qk=False, pv=False))
    errors = {}
    for p_scale in ("row", "static"):
        got, _ = _rewrite(f"int8:p_scale={p_scale}", arrays)
        errors[p_scale] = np.linalg.norm(got["out"] - exact["output"]) / np.linalg.norm(exact["output"])
    assert errors["row"] < 0.02 and errors["static"] > 0.5, errors


@pytest.mark.parametrize("spec,cfg", [
    ("int4", dict(bits=4)), ("quant:pv=fp", dict(pv=False)), ("quant:qk=fp", dict(qk=False)),
    ("quant:bits=4,smooth_v=true,granularity=head", dict(bits=4, gran="head", smooth_v=True)),
    ("quant:granularity=block:8,smooth_k=false", dict(gran="block:8", smooth_k=False)),
    ("int8:p_scale=static", dict(p_scale="static")), ("int4:p_scale=static", dict(bits=4, p_scale="static")),
])
def test_quant_matches_reference(spec, cfg):
    arrays = _arrays(np.random.default_rng(5), 2, 2, 20, 8)
    bias = np.zeros((2, 1, 1, 20), np.float32)
    bias[1, ..., -3:] = -1e9
    got, _ = _rewrite(spec, arrays, bias=bias)
    ref = Qz.quant_attention_reference(arrays["q"], arrays["k"], arrays["v"], scale=SCALE, cfg=_cfg(**cfg), bias=bias)
    np.testing.assert_allclose(got["out"], ref["output"], atol=5e-5, rtol=1e-4)


def test_smoothing_alone_is_exact():
    """K and V smoothing without quantisation reproduce softmax attention to float rounding."""
    arrays = _arrays(np.random.default_rng(6), 2, 2, 16, 8)
    got, _ = _rewrite("quant:qk=fp,pv=fp,smooth_k=true,smooth_v=true", arrays)
    ref = Qz.quant_attention_reference(arrays["q"], arrays["k"], arrays["v"], scale=SCALE,
                                       cfg=_cfg(qk=False, pv=False, smooth_k=False))
    np.testing.assert_allclose(got["out"], ref["output"], atol=2e-6, rtol=1e-5)


def test_k_smoothing_rescues_an_offset_key():
    """With a large shared K offset, smoothing is what keeps INT8 Q·Kᵀ accurate (why it is the default)."""
    rng = np.random.default_rng(7)
    arrays = _arrays(rng, 1, 2, 32, 16)
    arrays["k"] = arrays["k"] + np.float32(40)
    exact = Qz.quant_attention_reference(arrays["q"], arrays["k"], arrays["v"], scale=SCALE, cfg=_cfg(qk=False, pv=False))
    errs = {}
    for smooth in (True, False):
        got, _ = _rewrite(f"int8:smooth_k={str(smooth).lower()}", arrays)
        errs[smooth] = np.abs(got["out"] - exact["output"]).max()
    assert errs[True] < errs[False] / 4, errs


def test_static_scales_fit_and_saturate():
    """Static scales come from calibration; inputs beyond the calibrated range saturate, as documented."""
    rng = np.random.default_rng(8)
    calib = _arrays(rng, 4, 2, 16, 8)
    arrays = _arrays(rng, 1, 2, 16, 8)
    got, plan = _rewrite("quant:scales=static,granularity=head", arrays, calib=calib)
    static = plan.config.static
    assert static["q"].shape == (1, 2, 1, 1)
    np.testing.assert_allclose(static["q"][0, :, 0, 0], np.abs(calib["q"]).max(axis=(0, 2, 3)) / 63, rtol=1e-6)
    ref = Qz.quant_attention_reference(arrays["q"], arrays["k"], arrays["v"], scale=SCALE,
                                       cfg=dataclasses.replace(_cfg(gran="head"), static=static))
    np.testing.assert_allclose(got["out"], ref["output"], atol=5e-5, rtol=1e-4)
    assert "static" in plan.summary()["scales"] and len(plan.summary()["q scale per head"]) == 2


# --- paro ------------------------------------------------------------------------------------------


ORDERS_2D = ["none", "hw", "wh", "tile:2", "tile:3", "auto"]


@pytest.mark.parametrize("order", ORDERS_2D)
def test_paro_full_density_float_is_exact_for_every_order(order):
    """Density 1.0 at bits=16 is softmax attention whatever the order (permutation equivariance)."""
    arrays = _arrays(np.random.default_rng(9), 2, 2, 1 + 5 * 6, 8)
    got, plan = _rewrite(f"paro:density=1,bits=16,block=7,reorder={order}", arrays, grid=(5, 6), prefix=1)
    ref = Qz.quant_attention_reference(arrays["q"], arrays["k"], arrays["v"], scale=SCALE, cfg=_cfg(qk=False, pv=False))
    np.testing.assert_allclose(got["out"], ref["output"], atol=2e-6, rtol=1e-5)
    assert plan.summary()["density kept per head"] == [1.0, 1.0]


@pytest.mark.parametrize("order", ["fhw", "whf", "hfw", "auto"])
def test_paro_full_density_is_exact_on_video_grids(order):
    arrays = _arrays(np.random.default_rng(10), 1, 2, 2 * 3 * 4, 8)
    got, _ = _rewrite(f"paro:density=1,bits=16,block=5,reorder={order}", arrays, grid=(2, 3, 4), prefix=0)
    ref = Qz.quant_attention_reference(arrays["q"], arrays["k"], arrays["v"], scale=SCALE, cfg=_cfg(qk=False, pv=False))
    np.testing.assert_allclose(got["out"], ref["output"], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("case", ["prefix", "suffix_bias", "text", "blocked_prefix", "text_symbolic_bias"])
def test_paro_sparse_matches_reference(bits, case):
    """Half density: the graph equals quantised attention under the reference keep-mask."""
    rng = np.random.default_rng(11)
    grid, prefix, suffix, bias = (6, 6), 1, 0, None
    options = ""
    if case == "suffix_bias":
        prefix, suffix = 1, 2
    if case.startswith("text"):
        grid, prefix = None, None
    if case == "blocked_prefix":
        options = ",prefix=blocked"
    n = 36 + (prefix or 0) + suffix if grid else 30
    arrays = _arrays(rng, 2, 2, n, 8)
    if case != "prefix" and case != "blocked_prefix":
        bias = np.zeros((2, 1, 1, n), np.float32)
        bias[1, ..., -4:] = -1e9
        if case == "text_symbolic_bias":  # as BERT exports leave it: [B, ?, Nq, ?], materialised per query
            bias = np.broadcast_to(bias, (2, 1, n, n)).copy()
    dims = ["B", None, n, None] if case == "text_symbolic_bias" else None
    spec = f"paro:density=0.5,block=8,bits={bits}{options}"
    got, plan = _rewrite(spec, arrays, bias=bias, grid=grid, prefix=prefix, suffix=suffix, bias_dims=dims)
    keep = PR.keep_mask(plan.frame, plan.tables)
    cfg = PR.quant_config(plan.options)
    ref = Qz.quant_attention_reference(arrays["q"], arrays["k"], arrays["v"], scale=SCALE, cfg=cfg, bias=bias,
                                       keep=keep[None])
    np.testing.assert_allclose(got["out"], ref["output"], atol=5e-5, rtol=1e-4)
    assert 0.3 < plan.summary()["density kept per head"][0] < 0.9


def test_paro_keep_mask_rules():
    """Diagonal blocks and global rows/columns are always kept; every query row keeps the same count."""
    frame = PR.Frame(tokens=1 + 16, global_idx=(0,), blocked=tuple(range(1, 17)), grid=(4, 4), grid_start=0)
    rng = np.random.default_rng(12)
    q, k = rng.standard_normal((2, 3, 17, 4)).astype(np.float32), rng.standard_normal((2, 3, 17, 4)).astype(np.float32)
    tables = PR.fit_tables(q, k, None, scale=1.0, frame=frame, candidates=("hw", "wh", "tile:2"), block=4, kept=2,
                           keep_diag=True)
    mask = PR.keep_mask(frame, tables)
    assert mask[:, 0, :].all() and mask[:, :, 0].all()
    assert (mask[:, 1:, 1:].sum(axis=-1) == 8).all()  # 2 blocks of 4 keys per grid query
    for h in range(3):
        assert all(qb in row for qb, row in enumerate(tables.blocks[h]))


def test_paro_reorder_picks_the_order_attention_follows():
    """Heads that attend within columns choose column-major order; ones that attend within tiles choose tiles."""
    grid = (8, 8)
    r, c = np.indices(grid).reshape(2, -1)
    same_col = (c[:, None] == c[None, :]).astype(np.float32)
    same_tile = ((r[:, None] // 2 == r[None, :] // 2) & (c[:, None] // 2 == c[None, :] // 2)).astype(np.float32)
    # keys and queries whose dot products are large exactly where the pattern is set
    q = np.stack([np.eye(64, dtype=np.float32) * 1.0] * 2)[None]
    k = np.stack([same_col, same_tile])[None] * 20
    frame = PR.Frame(tokens=64, global_idx=(), blocked=tuple(range(64)), grid=grid, grid_start=0)
    tables = PR.fit_tables(q, k, None, scale=1.0, frame=frame, candidates=("hw", "wh", "tile:2"), block=4, kept=1,
                           keep_diag=True)
    assert tables.orders == ("wh", "tile:2")
    assert tables.mass_kept[1] > 0.99 and 0.45 < tables.mass_kept[0] < 0.55  # a column spans two blocks of 4


def test_paro_density_one_keeps_identity_order():
    """Every order keeps all mass at density 1: the identity wins the tie, so nothing is permuted."""
    arrays = _arrays(np.random.default_rng(13), 1, 2, 16, 4)
    frame = PR.Frame(tokens=16, global_idx=(), blocked=tuple(range(16)), grid=(4, 4), grid_start=0)
    tables = PR.fit_tables(arrays["q"], arrays["k"], None, scale=1.0, frame=frame, candidates=("hw", "wh", "tile:2"),
                           block=4, kept=4, keep_diag=True)
    assert tables.orders == ("hw", "hw") and np.allclose(tables.mass_kept, 1.0)


def test_paro_declines_heads_folded_into_the_batch():
    """A `[B·h, 1, N, d]` site (heads in the batch axis) cannot take per-head tables: a reason, not a crash."""
    f32 = ir.TensorType(ir.DataType.FLOAT)
    q, k, v = (ir.Value(name=x, shape=ir.Shape([4, 1, 16, 8]), type=f32) for x in "qkv")
    _, site = _site(2, 2, 16, 8)
    folded = AttentionSite(id="attn_0", info=dataclasses.replace(site.info, output_layout="squeeze1"), anchor=None,
                           q=q, k=k, v=v, output=None, bias=None, nodes=())
    reason = parse_pass("paro").applies(folded)
    assert isinstance(reason, str) and "heads into the batch" in reason
