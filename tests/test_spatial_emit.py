"""ONNX subgraphs of the spatial variants vs the float64 reference masks, run in onnxruntime.

Every test builds a tiny model (inputs Q, K, V [, bias]) with one emitter, runs it on spiky random
float32 inputs and compares with `masked_attention(..., allowed_*(...))`: max-abs ≤ 1e-5.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_ir import tape as ir_tape

from attnrewrite.passes.spatial import emit as E
from attnrewrite.passes.spatial import reference as R
from attnrewrite.passes.spatial import tables as S
from tests.conftest import ort_run, ort_session

SCALE = 0.5
TOL = 1e-5


def _run(emit, n, *, batch=2, h=2, d=4, dv=None, bias=None, dynamic_batch=False, opset=17, seed=0,
         dtype=np.float32, pad_value=-1e9, n_pad=2):
    """Build Q, K, V [, bias] → emit → output; run in ORT. Returns (output, arrays, bias array)."""
    rng = np.random.default_rng(seed)
    dv = dv or d
    arrays = {"q": rng.standard_normal((batch, h, n, d)) * 3, "k": rng.standard_normal((batch, h, n, d)),
              "v": rng.standard_normal((batch, h, n, dv))}
    arrays = {name: a.astype(dtype) for name, a in arrays.items()}
    ir_type = ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype)))
    dim0 = "B" if dynamic_batch else batch
    inputs = [ir.Value(name=nm, shape=ir.Shape([dim0, h, n, dd]), type=ir_type) for nm, dd in (("q", d), ("k", d), ("v", dv))]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": opset}, name="site")
    bias_arr = bias_value = None
    if bias == "const":
        bias_arr = rng.standard_normal((1, h, n, n)).astype(dtype)
        bias_value = ir.Value(name="bias", shape=ir.Shape(bias_arr.shape), type=ir_type, const_value=ir.tensor(bias_arr, name="bias"))
        graph.register_initializer(bias_value)
    elif bias == "const2d":  # rank-2 constant [n, n], broadcast over batch and heads
        bias_arr = rng.standard_normal((n, n)).astype(dtype)
        bias_value = ir.Value(name="bias", shape=ir.Shape(bias_arr.shape), type=ir_type, const_value=ir.tensor(bias_arr, name="bias"))
        graph.register_initializer(bias_value)
    elif bias in ("padding", "full", "rows", "rank3"):
        shape = {"padding": (batch, 1, 1, n), "full": (batch, h, n, n), "rows": (batch, 1, n, 1), "rank3": (h, n, n)}[bias]
        bias_arr = rng.standard_normal(shape).astype(dtype)
        if bias == "padding":
            bias_arr[:] = 0
            bias_arr[1:, ..., -n_pad:] = pad_value  # later batch rows have n_pad padded keys
        sym = list(shape) if bias == "rank3" else [dim0, *shape[1:]]
        bias_value = ir.Value(name="bias", shape=ir.Shape(sym), type=ir_type)
        graph.inputs.append(bias_value)
        arrays["bias"] = bias_arr
    out = emit(ir_tape.Tape(graph), *inputs, bias_value)
    out.name = "out"
    graph.outputs.append(out)
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    onnx.checker.check_model(proto, full_check=True)
    got = ort_run(proto, arrays)["out"]
    assert got.shape == (batch, h, n, dv)
    return got, arrays, bias_arr


def _check(got, arrays, bias, allowed, zero_keys=None, tol=TOL):
    want = R.masked_attention(arrays["q"], arrays["k"], arrays["v"], SCALE, allowed, bias, zero_keys)
    err = np.abs(got.astype(np.float64) - want).max()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


GRIDS = [(4, 4), (7, 5), (11, 13), (6, 9), (1, 7), (5, 1)]


# --- window ------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("size,shift", [((3, 3), (0, 0)), ((4, 2), (2, 1)), ((2, 3), (1, 1)), ((7, 7), (3, 3))])
def test_window(grid, prefix, size, shift):
    emit = lambda t, q, k, v, b: E.emit_window(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix, size=size, shift=shift)
    got, arrays, bias = _run(emit, prefix + grid[0] * grid[1])
    _check(got, arrays, bias, R.allowed_window(grid, prefix, size, shift))


def test_shifted_window_needs_no_extra_tiles_when_divisible():
    """The partial first and last segment share one (wrapped) tile, as in Swin's cyclic form."""
    plain = S.build_tables((14, 14), *S.rules_window((14, 14), 7))
    shifted = S.build_tables((14, 14), *S.rules_window((14, 14), 7, 3))
    assert plain.query_index.shape == shifted.query_index.shape == (4, 49)
    assert plain.allowed is None and shifted.allowed is not None


# --- neighbourhood, dilated, strided -----------------------------------------------------------


@pytest.mark.parametrize("grid,prefix", [((7, 5), 0), ((11, 13), 2), ((9, 9), 1), ((5, 12), 5), ((14, 14), 1)])
@pytest.mark.parametrize("kernel,dilation", [((3, 3), (1, 1)), ((5, 3), (1, 2)), ((2, 4), (2, 1)), ((3, 3), (2, 3)), ((7, 7), (1, 1))])
def test_neighborhood(grid, prefix, kernel, dilation):
    if kernel[0] * dilation[0] > grid[0] or kernel[1] * dilation[1] > grid[1]:
        pytest.skip("kernel x dilation larger than the grid")
    emit = lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix,
                                                     kernel=kernel, dilation=dilation)
    got, arrays, bias = _run(emit, prefix + grid[0] * grid[1])
    _check(got, arrays, bias, R.allowed_neighborhood(grid, prefix, kernel, dilation))


@pytest.mark.parametrize("tile", [1, 2, (3, 5), 13])
def test_neighborhood_any_tile_is_exact(tile):
    grid, prefix, kernel = (11, 13), 1, (5, 3)
    emit = lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix,
                                                     kernel=kernel, tile=tile)
    got, arrays, bias = _run(emit, prefix + grid[0] * grid[1])
    _check(got, arrays, bias, R.allowed_neighborhood(grid, prefix, kernel))


@pytest.mark.parametrize("grid,kernel,stride", [((8, 12), 4, 4), ((7, 9), 3, 2), ((10, 10), (5, 3), (3, 1))])
def test_strided_neighborhood(grid, kernel, stride):
    emit = lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=1,
                                                     kernel=kernel, stride=stride)
    got, arrays, bias = _run(emit, 1 + grid[0] * grid[1])
    _check(got, arrays, bias, R.allowed_neighborhood(grid, 1, kernel, stride=stride))


def test_neighborhood_tables_have_no_dense_mask_and_modest_overhead():
    """Sparse variants never build an [N, N] table; the chosen tiles keep computed/useful logits low."""
    for grid, kernel in [((32, 32), 5), ((14, 14), 7), ((64, 64), 7), ((64, 64), 15), ((24, 40), (3, 9))]:
        tables = S.build_tables(grid, *S.rules_neighborhood(grid, kernel))
        n = grid[0] * grid[1]
        assert tables.computed < n * n / 2 or n <= 196, f"{grid} {kernel}: {tables.computed} logits for {n} tokens"
        assert tables.overhead < 4.5, f"{grid} {kernel}: FLOP overhead {tables.overhead:.2f}"
    with pytest.raises(ValueError, match="exceeds"):
        S.rules_neighborhood((7, 7), 4, 2)


def test_tile_statistics_used_by_the_cost_model_match_the_tables():
    for length, k, d, stride in [(20, 5, 2, 1), (33, 6, 1, 3), (17, 4, 1, 1), (9, 9, 1, 1)]:
        mask = R.neighborhood_axis_mask(length, k, d, stride)
        for tile in range(1, 12):
            tiles = S._neighborhood_tiles(length, d, tile)
            assert S.axis_stats(mask, tiles) == S.axis_table(S.AxisRule(mask, tiles)).stats, (length, k, d, stride, tile)


# --- MaxViT grid, HaloNet ------------------------------------------------------------------------


@pytest.mark.parametrize("grid,prefix,size", [((8, 8), 1, (4, 4)), ((7, 10), 0, (3, 4)), ((9, 6), 2, (3, 3)),
                                              ((11, 13), 5, (5, 2)), ((7, 5), 1, (7, 1))])
def test_grid(grid, prefix, size):
    emit = lambda t, q, k, v, b: E.emit_grid(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix, size=size)
    got, arrays, bias = _run(emit, prefix + grid[0] * grid[1])
    _check(got, arrays, bias, R.allowed_grid(grid, prefix, size))


@pytest.mark.parametrize("border", ["mask", "zero"])
@pytest.mark.parametrize("grid,prefix,block,halo", [((8, 8), 1, 4, 1), ((7, 9), 0, 3, 2), ((6, 6), 2, 2, 1),
                                                    ((11, 13), 5, 4, 3), ((5, 7), 1, 8, 1)])
def test_halo(grid, prefix, block, halo, border):
    emit = lambda t, q, k, v, b: E.emit_halo(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix,
                                             block=block, halo=halo, border=border)
    got, arrays, bias = _run(emit, prefix + grid[0] * grid[1])
    zeros = R.halo_zero_keys(grid, prefix, block, halo) if border == "zero" else None
    _check(got, arrays, bias, R.allowed_halo(grid, prefix, block, halo, border), zeros)


@pytest.mark.parametrize("bias", ["const", "padding", "rows"])
def test_halo_zero_keys_take_no_bias(bias):
    grid, prefix = (6, 7), 1
    emit = lambda t, q, k, v, b: E.emit_halo(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix,
                                             block=3, halo=1, border="zero")
    got, arrays, b = _run(emit, prefix + grid[0] * grid[1], bias=bias, batch=3)
    _check(got, arrays, b, R.allowed_halo(grid, prefix, 3, 1, "zero"), R.halo_zero_keys(grid, prefix, 3, 1))


# --- bias, prefix modes, batch, dtype ---------------------------------------------------------------


@pytest.mark.parametrize("bias", [None, "const", "const2d", "padding", "full", "rows", "rank3"])
@pytest.mark.parametrize("prefix_mode", ["global", "local"])
@pytest.mark.parametrize("variant", ["window", "neighborhood", "grid"])
def test_bias_and_prefix_modes(bias, prefix_mode, variant):
    grid, prefix = (6, 7), 2
    kw = dict(scale=SCALE, grid=grid, prefix=prefix, prefix_mode=prefix_mode)
    emit, allowed = {
        "window": (lambda t, q, k, v, b: E.emit_window(t, q, k, v, bias=b, size=(4, 3), shift=(2, 1), **kw),
                   R.allowed_window(grid, prefix, (4, 3), (2, 1), prefix_mode)),
        "neighborhood": (lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, bias=b, kernel=3, **kw),
                         R.allowed_neighborhood(grid, prefix, 3, prefix_mode=prefix_mode)),
        "grid": (lambda t, q, k, v, b: E.emit_grid(t, q, k, v, bias=b, size=(3, 3), **kw),
                 R.allowed_grid(grid, prefix, (3, 3), prefix_mode)),
    }[variant]
    got, arrays, b = _run(emit, prefix + grid[0] * grid[1], bias=bias, batch=3, dv=6)
    _check(got, arrays, b, allowed)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("variant", ["window", "neighborhood", "halo"])
def test_dynamic_batch(opset, variant):
    grid, prefix = (5, 6), 1
    kw = dict(scale=SCALE, grid=grid, prefix=prefix)
    emit, allowed, zeros = {
        "window": (lambda t, q, k, v, b: E.emit_window(t, q, k, v, bias=b, size=(2, 4), shift=(1, 2), **kw),
                   R.allowed_window(grid, prefix, (2, 4), (1, 2)), None),
        "neighborhood": (lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, bias=b, kernel=3, dilation=(1, 2), **kw),
                         R.allowed_neighborhood(grid, prefix, 3, (1, 2)), None),
        "halo": (lambda t, q, k, v, b: E.emit_halo(t, q, k, v, bias=b, block=2, halo=1, border="zero", **kw),
                 R.allowed_halo(grid, prefix, 2, 1, "zero"), R.halo_zero_keys(grid, prefix, 2, 1)),
    }[variant]
    got, arrays, bias = _run(emit, prefix + grid[0] * grid[1], batch=3, dynamic_batch=True, bias="padding", opset=opset)
    _check(got, arrays, bias, allowed, zeros)


def test_float16_graph():
    grid, prefix = (5, 6), 1
    emit = lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix, kernel=3)
    got, arrays, bias = _run(emit, prefix + grid[0] * grid[1], bias="padding", dtype=np.float16, pad_value=-np.inf)
    assert got.dtype == np.float16 and np.isfinite(got).all()
    _check(got, arrays, bias, R.allowed_neighborhood(grid, prefix, 3), tol=2e-2)


@pytest.mark.parametrize("pad_value", [-np.inf, np.finfo(np.float32).min, -1e9])
def test_fully_padded_window_stays_finite(pad_value):
    """A query whose whole window is padding has no finite row in a naive mask; ours never NaNs,
    and every query with an unpadded key matches the reference exactly."""
    length = 12
    emit = lambda t, q, k, v, b: E.emit_sliding_1d(t, q, k, v, scale=SCALE, bias=b, window=3, mode="block")
    got, arrays, bias = _run(emit, length, bias="padding", pad_value=pad_value, n_pad=3)
    assert np.isfinite(got).all()
    live = np.ones(length, bool)
    live[-3:] = False  # rows of the fully padded last block (batch row 1) are excluded below
    want = R.masked_attention(arrays["q"], arrays["k"], arrays["v"], SCALE, R.allowed_sliding_1d(length, 3, mode="block"),
                              np.maximum(bias, -1e30))
    err = max(np.abs(got[0] - want[0]).max(), np.abs(got[1][:, live] - want[1][:, live]).max())
    assert err <= TOL, f"max abs error {err:.3g}"


# --- 1-D text ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["centered", "block"])
@pytest.mark.parametrize("length,window,prefix", [(13, 5, 0), (16, 4, 1), (9, 20, 0), (31, 8, 2)])
def test_sliding_1d_honours_padding(mode, length, window, prefix):
    emit = lambda t, q, k, v, b: E.emit_sliding_1d(t, q, k, v, scale=SCALE, bias=b, window=window, mode=mode, prefix=prefix)
    got, arrays, bias = _run(emit, length, bias="padding", dynamic_batch=True, batch=3)
    _check(got, arrays, bias, R.allowed_sliding_1d(length, window, prefix, mode))


@pytest.mark.parametrize("length,window,dilation", [(13, 3, 2), (16, 5, 3), (9, 4, 2)])
def test_sliding_1d_dilated_matches_dina(length, window, dilation):
    emit = lambda t, q, k, v, b: E.emit_sliding_1d(t, q, k, v, scale=SCALE, bias=b, window=window, dilation=dilation)
    got, arrays, bias = _run(emit, length, bias="padding", dynamic_batch=True, batch=2)
    allowed = R.allowed_sliding_1d(length, window, dilation=dilation)
    assert (allowed.sum(-1) == window).all()  # exactly `window` keys, all in the query's residue class
    i = np.arange(length)
    assert not (allowed & (i[:, None] % dilation != i[None, :] % dilation)).any()
    _check(got, arrays, bias, allowed)


# --- anchors: configurations that are full attention ------------------------------------------------


@pytest.mark.parametrize("grid,prefix", [((7, 5), 1), ((4, 9), 0), ((6, 6), 5), ((11, 13), 2)])
@pytest.mark.parametrize("variant", ["window", "window_big", "neighborhood", "halo", "halo_big", "grid"])
def test_anchor_equals_full_attention(grid, prefix, variant):
    side = max(grid)
    kw = dict(scale=SCALE, grid=grid, prefix=prefix)
    emit = {
        "window": lambda t, q, k, v, b: E.emit_window(t, q, k, v, bias=b, size=grid, **kw),
        "window_big": lambda t, q, k, v, b: E.emit_window(t, q, k, v, bias=b, size=side + 3, **kw),
        "neighborhood": lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, bias=b, kernel=grid, **kw),
        "halo": lambda t, q, k, v, b: E.emit_halo(t, q, k, v, bias=b, block=side, halo=0, **kw),
        "halo_big": lambda t, q, k, v, b: E.emit_halo(t, q, k, v, bias=b, block=2, halo=side, **kw),
        "grid": lambda t, q, k, v, b: E.emit_grid(t, q, k, v, bias=b, size=grid, **kw),
    }[variant]
    got, arrays, bias = _run(emit, prefix + grid[0] * grid[1], bias="const")
    n = prefix + grid[0] * grid[1]
    _check(got, arrays, bias, np.ones((n, n), bool))


@pytest.mark.parametrize("grid,size", [((8, 8), (4, 4)), ((6, 9), (2, 3))])
def test_cross_variant_identities_in_onnx(grid, size):
    """grid(G) ≡ DiNA(k=G, d=H/G) and W-MSA(w) ≡ NATTEN blocked mode, as ONNX outputs."""
    dil = (grid[0] // size[0], grid[1] // size[1])
    n = 1 + grid[0] * grid[1]
    outs = {}
    for name, emit in {
        "grid": lambda t, q, k, v, b: E.emit_grid(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=1, size=size),
        "dina": lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=1, kernel=size, dilation=dil),
        "window": lambda t, q, k, v, b: E.emit_window(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=1, size=size),
        "blocked": lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=1, kernel=size, stride=size),
    }.items():
        outs[name] = _run(emit, n, seed=3)[0]
    assert np.abs(outs["grid"] - outs["dina"]).max() <= TOL
    assert np.abs(outs["window"] - outs["blocked"]).max() <= TOL


# --- graph hygiene -------------------------------------------------------------------------------


def test_sites_share_tables_and_bad_inputs_are_refused():
    grid, h, d = (8, 8), 2, 4
    vals = [ir.Value(name=n, shape=ir.Shape([1, h, 64, d]), type=ir.TensorType(ir.DataType.FLOAT)) for n in "qkv"]
    graph = ir.Graph(vals, [], nodes=[], opset_imports={"": 17})
    counts = []
    for _ in range(2):
        E.emit_neighborhood(ir_tape.Tape(graph), *vals, scale=SCALE, bias=None, grid=grid, prefix=0, kernel=3)
        counts.append(len(graph.initializers))
    assert counts[0] >= 1 and counts[1] == counts[0], f"initializers after each site: {counts}"
    with pytest.raises(ValueError, match="tokens"):
        E.emit_window(ir_tape.Tape(graph), *vals, scale=SCALE, bias=None, grid=(7, 8), prefix=0, size=2)
    bad = ir.Value(name="b", shape=ir.Shape([1, 1, 5, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    with pytest.raises(ValueError, match="must be 1 or 64"):
        E.emit_window(ir_tape.Tape(graph), *vals, scale=SCALE, bias=bad, grid=grid, prefix=0, size=2)


# --- 1-D text, sequence length known only at run time ----------------------------------------------


def _dynamic_length_session(window, mode, prefix, prefix_mode, bias_layout):
    """One model with a symbolic token axis T; `bias_layout`: None, "key" [B,1,1,T] or "rows" [B,1,T,T]
    (an expanded padding mask the pipeline has found to be the same for every query)."""
    ty = ir.TensorType(ir.DataType.FLOAT)
    qkv = [ir.Value(name=n, shape=ir.Shape(["B", 2, "T", 4]), type=ty) for n in "qkv"]
    graph = ir.Graph(qkv, [], nodes=[], opset_imports={"": 17}, name="site")
    bias = None
    if bias_layout:
        rows = 1 if bias_layout == "key" else "T"
        bias = ir.Value(name="bias", shape=ir.Shape(["B", 1, rows, "T"]), type=ty)
        graph.inputs.append(bias)
    out = E.emit_sliding_1d(ir_tape.Tape(graph), *qkv, scale=SCALE, bias=bias, window=window, mode=mode, prefix=prefix,
                            prefix_mode=prefix_mode, bias_per_key=bias_layout == "rows")
    out.name = "out"
    graph.outputs.append(out)
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    onnx.checker.check_model(proto, full_check=True)
    return ort_session(proto)


@pytest.mark.parametrize("mode", ["centered", "block"])
@pytest.mark.parametrize("window,prefix,prefix_mode,bias_layout", [
    (5, 0, "global", "key"), (4, 1, "global", "rows"), (3, 2, "local", "key"), (8, 1, "global", None), (1, 0, "global", "key"),
])
def test_sliding_1d_dynamic_length(mode, window, prefix, prefix_mode, bias_layout):
    """One graph serves every length: shorter than the window (full attention), exactly one window,
    partial last blocks, long sequences; batch row 1 has its last two keys padded."""
    sess = _dynamic_length_session(window, mode, prefix, prefix_mode, bias_layout)
    rng = np.random.default_rng(window + prefix)
    for n in sorted({prefix + 1, prefix + 2, prefix + window - 1, prefix + window, prefix + window + 1, prefix + 40}):
        if n <= prefix:
            continue
        arrays = {"q": rng.standard_normal((3, 2, n, 4)) * 3, "k": rng.standard_normal((3, 2, n, 4)),
                  "v": rng.standard_normal((3, 2, n, 4))}
        arrays = {name: a.astype(np.float32) for name, a in arrays.items()}
        key_bias = np.zeros((3, 1, 1, n), np.float32)
        key_bias[1, ..., -min(2, n - 1):] = -1e9 if n > 1 else 0.0
        if bias_layout:
            arrays["bias"] = key_bias if bias_layout == "key" else np.repeat(key_bias, n, axis=2)
        got = ort_run(sess, arrays)["out"]
        allowed = R.allowed_sliding_1d(n, window, prefix, mode, prefix_mode)
        want = R.masked_attention(arrays["q"], arrays["k"], arrays["v"], SCALE, allowed,
                                  key_bias if bias_layout else None)
        # a query whose every allowed key is padding has no defined answer (see the test above)
        live = (allowed & (key_bias[1, 0, 0] == 0)[None, :]).any(-1) if bias_layout else np.ones(n, bool)
        err = max(np.abs(got[[0, 2]] - want[[0, 2]]).max(), np.abs(got[1][:, live] - want[1][:, live]).max())
        assert err <= TOL, f"T={n}: max abs error {err:.3g}"
