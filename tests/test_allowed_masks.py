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
