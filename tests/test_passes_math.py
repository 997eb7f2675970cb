"""Each pass's ONNX emission against its numpy reference, on random sharp Q/K/V."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir import tape as ir_tape

from attnrewrite.passes.linear import (
    fit_output_correction,
    key_weight_reference,
    linear_attention,
    linear_reference,
)
from attnrewrite.passes.ops import softmax_attention
from attnrewrite.onnx.verify import reference_attention
from tests.conftest import ort_run


def _run(emit, arrays: dict[str, np.ndarray], opset: int) -> np.ndarray:
    inputs = [ir.Value(name=n, shape=ir.Shape(["B", *a.shape[1:]]), type=ir.TensorType(ir.DataType.FLOAT))
              for n, a in arrays.items()]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": opset})
    out = emit(ir_tape.Tape(graph), graph, *inputs)
    out.name = "out"
    graph.outputs.append(out)
    return ort_run(ir.Model(graph, ir_version=10), arrays)["out"]


def _qkv(seed=0, b=3, h=2, n=9, d=4):
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal((b, h, n, d)) * 2).astype(np.float32) for name in "qkv"}


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("phi", ["elu1", "relu"])
def test_linear_onnx_matches_reference(opset, phi):
    arrays = _qkv()
    got = _run(lambda t, g, q, k, v: linear_attention(t, g, q, k, v, scale=0.3, phi=phi, eps=1e-6), arrays, opset)
    want = linear_reference(arrays["q"], arrays["k"], arrays["v"], scale=0.3, phi=phi, eps=1e-6)
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()


def test_linear_key_weights_equal_dropping_masked_keys():
    """A padding mask (−inf on the last keys) must be exactly the same as deleting those keys."""
    a = _qkv(n=8)
    bias = np.zeros((3, 1, 1, 8), np.float32)
    bias[..., 6:] = -np.inf
    masked = linear_reference(a["q"], a["k"], a["v"], scale=0.3, phi="elu1", eps=1e-9, key_weight=key_weight_reference(bias))
    dropped = linear_reference(a["q"], a["k"][:, :, :6], a["v"][:, :, :6], scale=0.3, phi="elu1", eps=1e-9)
    assert np.abs(masked - dropped).max() <= 1e-9


def test_linear_quadratic_form_equals_linear_form():
    """normalize(φQ·φKᵀ)·V (quadratic) == φQ·(φKᵀV)/(φQ·ΣφK) (linear), ALGORITHMS.md §6 anchor (i)."""
    a = {k: v.astype(np.float64) for k, v in _qkv().items()}
    fq = np.where(a["q"] * np.sqrt(0.3) > 0, a["q"] * np.sqrt(0.3) + 1, np.exp(np.minimum(a["q"] * np.sqrt(0.3), 0)))
    fk = np.where(a["k"] * np.sqrt(0.3) > 0, a["k"] * np.sqrt(0.3) + 1, np.exp(np.minimum(a["k"] * np.sqrt(0.3), 0)))
    w = fq @ np.swapaxes(fk, -1, -2)
    quadratic = (w / w.sum(-1, keepdims=True)) @ a["v"]
    linear = linear_reference(a["q"], a["k"], a["v"], scale=0.3, phi="elu1", eps=0.0)
    assert np.abs(quadratic - linear).max() <= 1e-10


def test_output_correction_recovers_a_known_affine_map():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2, 50, 3))
    r_true = rng.standard_normal((2, 3, 3))
    b_true = rng.standard_normal((2, 1, 3))
    y = x @ r_true[None] + b_true[None]
    r, b = fit_output_correction(x, y, ridge=1e-8)
    assert np.abs(r - r_true).max() < 1e-3 and np.abs(b - b_true).max() < 1e-3


@pytest.mark.parametrize("opset", [17, 18])
def test_sdpa_onnx_matches_reference(opset):
    arrays = _qkv()
    got = _run(lambda t, g, q, k, v: softmax_attention(t, q, k, v, 0.4, None), arrays, opset)
    want = reference_attention(arrays["q"], arrays["k"], arrays["v"], 0.4)
    assert np.abs(got - want).max() <= 1e-5
