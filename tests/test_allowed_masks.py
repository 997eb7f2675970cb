"""Each spatial pass's `allowed(site, plan)` (the reference mask a torch module uses) is exactly the
support of the ONNX subgraph the same pass emits: with Q = K = 0 every allowed key gets equal weight
and every other key none, read off the emitted graph with V = identity blocks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from attnrewrite.registry import parse_pass
from attnrewrite.synthetic import lone_site
from attnrewrite.validate.attention_maps import effective_weights

CASES = [
    ("window:size=2x3", dict(grid=(4, 6), prefix=1), 25),
    ("window:size=4x4,shift=half", dict(grid=(6, 6), prefix=1), 37),
    ("window:size=3x3,prefix=local", dict(grid=(6, 6), prefix=2), 38),
    ("window:size=2x2", dict(grid=(4, 4), prefix=1, suffix=2), 19),
    ("window:size=5", dict(), 23),
    ("neighborhood:kernel=3", dict(grid=(5, 6), prefix=1), 31),
    ("neighborhood:kernel=3,dilation=2", dict(grid=(6, 6), prefix=0), 36),
    ("neighborhood:kernel=5,global_tokens=2", dict(), 21),
    ("neighborhood:kernel=3,dilation=2", dict(), 20),
    ("grid:size=2", dict(grid=(4, 6), prefix=1), 25),
]


@pytest.mark.parametrize("spec,frame,tokens", CASES)
def test_allowed_is_the_support_of_the_emitted_subgraph(spec, frame, tokens):
    graph, site = lone_site(1, 2, tokens, 4, scale=0.5, **frame)
    pass_spec = parse_pass(spec)
    plan = pass_spec.applies(site)
    assert not isinstance(plan, str), plan
    allowed = pass_spec.impl.allowed(site, plan)
    zeros = np.zeros((1, 2, tokens, 4), np.float32)
    weights = effective_weights(ir.Model(graph, ir_version=10), pass_spec, site, plan, zeros, zeros, None)
    support = weights > 1e-9
    assert np.array_equal(support[0], allowed) and np.array_equal(support[1], allowed)
    np.testing.assert_allclose(weights[0][allowed], np.repeat(1 / allowed.sum(1), allowed.sum(1)), rtol=1e-5)


@pytest.mark.parametrize("spec", ["halo:block=2,halo=1", "halo:block=2,halo=1,border=zero", "halo:block=4,halo=2"])
def test_halo_allowed_and_zero_keys_are_the_emitted_weights(spec):
    """HaloNet: the support is the in-grid part of each block's neighbourhood; with border=zero the
    zero-padded keys (`zero_keys`) take their share of the softmax mass, so each allowed key weighs
    1 / (allowed + zero keys) when all logits are equal."""
    graph, site = lone_site(1, 2, 37, 4, scale=0.5, grid=(6, 6), prefix=1)
    pass_spec = parse_pass(spec)
    plan = pass_spec.applies(site)
    allowed, zero = pass_spec.impl.allowed(site, plan), pass_spec.impl.zero_keys(site, plan)
    assert (zero is not None) == spec.endswith("zero") and (zero is None or zero[1:].max() > 0)
    zeros = np.zeros((1, 2, 37, 4), np.float32)
    weights = effective_weights(ir.Model(graph, ir_version=10), pass_spec, site, plan, zeros, zeros, None)[0]
    assert np.array_equal(weights > 1e-9, allowed)
    share = 1 / (allowed.sum(1) + (0 if zero is None else zero))
    np.testing.assert_allclose(weights[allowed], np.repeat(share, allowed.sum(1)), rtol=1e-5)
