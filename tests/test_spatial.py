"""Spatial variants: ONNX subgraphs vs the dense reference, exactness anchors, per-axis properties."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir import tape as ir_tape

from attnrewrite.passes import spatial_emit as E
from attnrewrite.passes import spatial_reference as R

SCALE = 0.5


def _run(emit, grid, prefix, batch=2, h=2, d=4, bias=None, dynamic_batch=False, opset=17, seed=0):
    n = prefix + grid[0] * grid[1]
    rng = np.random.default_rng(seed)
    arrays = {name: (rng.standard_normal((batch, h, n, d)) * 1.5).astype(np.float32) for name in "qkv"}
    dim0 = "B" if dynamic_batch else batch
    inputs = [ir.Value(name=nm, shape=ir.Shape([dim0, h, n, d]), type=ir.TensorType(ir.DataType.FLOAT)) for nm in "qkv"]
    bias_value = None
    if bias == "const":
        arr = rng.standard_normal((1, h, n, n)).astype(np.float32)
        bias_value = ir.Value(name="bias", shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT),
                              const_value=ir.tensor(arr, name="bias"))
        arrays_bias = arr
    elif bias == "padding":
        arr = np.zeros((batch, 1, 1, n), np.float32)
        arr[1:, ..., -2:] = -1e9  # never a fully masked window: float32 cannot order -1e9 + x
        bias_value = ir.Value(name="bias", shape=ir.Shape([dim0, 1, 1, n]), type=ir.TensorType(ir.DataType.FLOAT))
        inputs.append(bias_value)
        arrays["bias"] = arrays_bias = arr
    elif bias == "full":
        arr = rng.standard_normal((batch, h, n, n)).astype(np.float32)
        bias_value = ir.Value(name="bias", shape=ir.Shape([dim0, h, n, n]), type=ir.TensorType(ir.DataType.FLOAT))
        inputs.append(bias_value)
        arrays["bias"] = arrays_bias = arr
    else:
        arrays_bias = None
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": opset})
    if bias == "const":
        graph.register_initializer(bias_value)
    out = emit(ir_tape.Tape(graph), *inputs[:3], bias_value)
    out.name = "out"
    graph.outputs.append(out)
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in arrays.items() if k in {i.name for i in sess.get_inputs()}}
    return sess.run(None, feeds)[0], arrays, arrays_bias


def _check(got, arrays, bias, allowed, zero_keys=None):
    want = R.masked_attention(arrays["q"], arrays["k"], arrays["v"], SCALE, allowed, bias, zero_keys)
    err = np.abs(got - want).max()
    assert err <= 1e-5, f"max abs error {err:.3g}"


GRIDS = [(4, 4), (7, 5), (11, 13), (6, 9), (1, 7)]


@pytest.mark.parametrize("grid,prefix", [(g, p) for g in GRIDS for p in (0, 1, 5)])
@pytest.mark.parametrize("size,shift", [((3, 3), (0, 0)), ((4, 2), (2, 1)), ((2, 3), (1, 1))])
def test_window_matches_reference(grid, prefix, size, shift):
    size = (min(size[0], grid[0]), min(size[1], grid[1]))
    shift = (shift[0] % size[0] if size[0] > 1 else 0, shift[1] % size[1] if size[1] > 1 else 0)
    emit = lambda t, q, k, v, b: E.emit_window(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix, size=size, shift=shift)
    got, arrays, bias = _run(emit, grid, prefix)
    _check(got, arrays, bias, R.allowed_mask(grid, prefix, *E.rules_window(grid, size, shift)))


@pytest.mark.parametrize("grid,prefix", [((7, 5), 0), ((11, 13), 2), ((9, 9), 1), ((5, 12), 4)])
@pytest.mark.parametrize("kernel,dilation", [((3, 3), (1, 1)), ((5, 3), (1, 2)), ((2, 4), (2, 1)), ((3, 3), (2, 3))])
def test_neighborhood_matches_reference(grid, prefix, kernel, dilation):
    if kernel[0] * dilation[0] > grid[0] or kernel[1] * dilation[1] > grid[1]:
        pytest.skip("kernel x dilation larger than the grid")
    emit = lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix,
                                                     kernel=kernel, dilation=dilation)
    got, arrays, bias = _run(emit, grid, prefix)
    _check(got, arrays, bias, R.allowed_mask(grid, prefix, *E.rules_neighborhood(grid, kernel, dilation)))


@pytest.mark.parametrize("grid,prefix,size", [((8, 8), 1, (4, 4)), ((7, 10), 0, (3, 4)), ((9, 6), 2, (3, 3))])
def test_grid_matches_reference(grid, prefix, size):
    emit = lambda t, q, k, v, b: E.emit_grid(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix, size=size)
    got, arrays, bias = _run(emit, grid, prefix)
    _check(got, arrays, bias, R.allowed_mask(grid, prefix, *E.rules_grid(grid, size)))


@pytest.mark.parametrize("border", ["mask", "zero"])
@pytest.mark.parametrize("grid,prefix,block,halo", [((8, 8), 1, 4, 1), ((7, 9), 0, 3, 2), ((6, 6), 2, 2, 1)])
def test_halo_matches_reference(grid, prefix, block, halo, border):
    emit = lambda t, q, k, v, b: E.emit_halo(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix,
                                             block=block, halo=halo, border=border)
    got, arrays, bias = _run(emit, grid, prefix)
    ry, rx = E.rules_halo(grid, block, halo, border)
    _check(got, arrays, bias, R.allowed_mask(grid, prefix, ry, rx), R.zero_key_counts(grid, prefix, ry, rx))


@pytest.mark.parametrize("bias", ["const", "padding", "full"])
@pytest.mark.parametrize("prefix_mode", ["global", "local"])
def test_bias_and_prefix_modes(bias, prefix_mode):
    grid, prefix = (6, 7), 2
    emit = lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix,
                                                     kernel=(3, 3), prefix_mode=prefix_mode)
    got, arrays, b = _run(emit, grid, prefix, bias=bias, batch=3)
    _check(got, arrays, b, R.allowed_mask(grid, prefix, *E.rules_neighborhood(grid, (3, 3)), prefix_mode=prefix_mode))


@pytest.mark.parametrize("opset", [17, 18])
def test_dynamic_batch(opset):
    grid, prefix = (5, 6), 1
    emit = lambda t, q, k, v, b: E.emit_window(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix, size=(2, 4), shift=(1, 2))
    got, arrays, bias = _run(emit, grid, prefix, batch=3, dynamic_batch=True, bias="padding", opset=opset)
    _check(got, arrays, bias, R.allowed_mask(grid, prefix, *E.rules_window(grid, (2, 4), (1, 2))))


@pytest.mark.parametrize("mode", ["centered", "block"])
def test_sliding_1d_honours_padding(mode):
    length = 13
    emit = lambda t, q, k, v, b: E.emit_sliding_1d(t, q, k, v, scale=SCALE, bias=b, window=5, mode=mode)
    got, arrays, bias = _run(emit, (1, length), 0, bias="padding")
    rule = R.neighborhood_axis(length, 5) if mode == "centered" else R.window_axis(length, 5)
    _check(got, arrays, bias, R.allowed_mask((1, length), 0, R.window_axis(1, 1), rule))


# --- exactness anchors: configurations equal to full attention -----------------------------------


def _full(grid, prefix):
    n = prefix + grid[0] * grid[1]
    return np.ones((n, n), bool)


@pytest.mark.parametrize("grid,prefix", [((7, 5), 1), ((4, 9), 0), ((6, 6), 4)])
@pytest.mark.parametrize("variant", ["window", "neighborhood", "halo", "grid", "halo_big"])
def test_anchor_equals_full_attention(grid, prefix, variant):
    h, w = grid
    emitters = {
        "window": lambda t, q, k, v, b: E.emit_window(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix, size=grid),
        "neighborhood": lambda t, q, k, v, b: E.emit_neighborhood(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix, kernel=grid),
        "halo": lambda t, q, k, v, b: E.emit_halo(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix, block=max(grid), halo=0),
        "halo_big": lambda t, q, k, v, b: E.emit_halo(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix, block=2, halo=max(grid)),
        "grid": lambda t, q, k, v, b: E.emit_grid(t, q, k, v, scale=SCALE, bias=b, grid=grid, prefix=prefix, size=grid),
    }
    got, arrays, bias = _run(emitters[variant], grid, prefix)
    want = R.masked_attention(arrays["q"], arrays["k"], arrays["v"], SCALE, _full(grid, prefix))
    assert np.abs(got - want).max() <= 1e-5


def test_dilation_one_is_plain_neighborhood():
    for length, k in itertools.product(range(3, 16), range(1, 8)):
        if k <= length:
            assert R.neighborhood_axis(length, k, 1).keys == R.neighborhood_axis(length, k).keys


def test_grid_equals_dilated_neighborhood_when_divisible():
    """MaxViT grid(G) ≡ DiNA(k=G, d=H/G) (ALGORITHMS.md §4)."""
    for g, s in itertools.product(range(1, 6), range(1, 5)):
        length = g * s
        assert R.grid_axis(length, g).keys == R.neighborhood_axis(length, g, s).keys


def test_window_equals_natten_blocked_mode_when_divisible():
    """W-MSA(w) ≡ GNA with stride = kernel = w when w divides the side (ALGORITHMS.md §1)."""
    for w, blocks in itertools.product(range(1, 6), range(1, 5)):
        length = w * blocks
        keys = R.window_axis(length, w).keys
        for i in range(length):
            start = (i // w) * w
            assert keys[i] == list(range(start, start + w))


def test_neighborhood_sees_exactly_k_keys_and_contains_itself():
    for length, k, d in itertools.product(range(1, 20), range(1, 8), range(1, 4)):
        if k * d <= length:
            for i, keys in enumerate(R.neighborhood_axis(length, k, d).keys):
                assert len(set(keys)) == k and i in keys and all((x - i) % d == 0 for x in keys)


def _swin_roll_mask(h, w, ws, s):
    """Brute-force Swin: roll by −s, partition into ws windows, mask pairs from different regions."""
    img = np.zeros((h, w), int)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img[hs, wsl] = cnt
            cnt += 1
    allowed = np.zeros((h * w, h * w), bool)
    for y1, x1, y2, x2 in itertools.product(range(h), range(w), range(h), range(w)):
        same_win = (y1 // ws == y2 // ws) and (x1 // ws == x2 // ws)
        if same_win and img[y1, x1] == img[y2, x2]:
            # rolled coordinates back to original positions
            oy1, ox1, oy2, ox2 = (y1 + s) % h, (x1 + s) % w, (y2 + s) % h, (x2 + s) % w
            allowed[oy1 * w + ox1, oy2 * w + ox2] = True
    return allowed


@pytest.mark.parametrize("h,w,ws", [(8, 8, 4), (6, 9, 3), (12, 8, 4), (10, 10, 5)])
def test_shifted_windows_equal_swin_roll_and_mask(h, w, ws):
    s = ws // 2
    ours = R.allowed_mask((h, w), 0, R.window_axis(h, ws, s), R.window_axis(w, ws, s))
    assert np.array_equal(ours, _swin_roll_mask(h, w, ws, s))


def test_tile_overhead_reported():
    tables = E.build_tables((16, 16), *E.rules_neighborhood((16, 16), (5, 5)))
    assert 0.2 < tables.useful_fraction <= 1.0
    assert E.build_tables((8, 8), *E.rules_window((8, 8), (4, 4))).mask is None
