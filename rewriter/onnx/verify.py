"""Numerical proof that a detected site means what its `AttentionSite` says.

For every candidate we cut out the subgraph from the site's raw operands to its output (plus the
Q/K/V/bias views detection built), run it in onnxruntime on random operands, and compare the output
with `softmax(scale·Q·Kᵀ + bias)·V` computed in float32 from the same run's Q, K, V and bias. A site
that fails is reported with the error and never rewritten. All sites run in one session; only if
that fails do we run them one by one to find the culprit.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from attnrewrite.errors import ort_message
from attnrewrite.ir.dtypes import numpy_dtype_of_ort
from attnrewrite.ir.graph import is_constant
from attnrewrite.layout import output_as_bhnd
from attnrewrite.site import AttentionSite
from attnrewrite.runtime import cpu_session
from attnrewrite.ir.submodel import build_submodel

#: Relative L2 error above which a reading of a site is considered wrong (float32 models).
TOLERANCE = 1e-4
#: Half-precision models round every intermediate to 11 (fp16) or 8 (bf16) significant bits, so the
#: site's own output is only that accurate; a misread scale or mask still errs by far more (> 1e-1).
_HALF_TOLERANCE = {np.dtype(np.float16): 5e-3, "bfloat16": 3e-2}


def tolerance_for(dtype) -> float:
    """The verification tolerance for a site computed in `dtype`."""
    dtype = np.dtype(dtype)
    return _HALF_TOLERANCE.get(dtype, _HALF_TOLERANCE["bfloat16"] if dtype.name == "bfloat16" else TOLERANCE)
#: Sizes tried for dimensions the graph leaves symbolic (batch, dynamic sequence length).
_DYNAMIC_SIZES = (2, 1)


def reference_attention(q, k, v, scale: float, bias=None) -> np.ndarray:
    """The meaning of a site: softmax(scale·Q·Kᵀ + bias)·V over the last axis.

    Computed in float32 with a max-shifted softmax: its error (~1e-6 relative) is far below the
    1e-4 tolerance, and float64 would dominate the cost of inspecting large models.
    """
    logits = np.float32(scale) * np.matmul(q.astype(np.float32), np.swapaxes(k.astype(np.float32), -1, -2))
    if bias is not None:
        logits = logits + bias.astype(np.float32)
    logits = logits - np.max(logits, axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights /= np.sum(weights, axis=-1, keepdims=True)
    return np.matmul(weights, v.astype(np.float32))


def verify_sites(model: ir.Model, sites: list[AttentionSite]) -> dict[str, str]:
    """Check every site; returns {site id: reason} for those that fail."""
    try:
        return _verify_together(model, sites)
    except Exception:  # noqa: BLE001 - find the culprit one by one
        failures = {}
        for site in sites:
            try:
                failures.update(_verify_together(model, [site]))
            except Exception as exc:  # noqa: BLE001
                failures[site.id] = f"could not be verified numerically: {ort_message(exc)}"
        return failures


def _site_outputs(site: AttentionSite) -> list[ir.Value]:
    outs = [site.output, site.q, site.k, site.v]
    if site.bias is not None:
        outs.append(site.bias)
    return outs


def _verify_together(model: ir.Model, sites: list[AttentionSite]) -> dict[str, str]:
    covered = {id(n) for site in sites for n in site.nodes}
    const_memo: dict = {}

    def inside(node: ir.Node) -> bool:
        return (
            id(node) in covered
            or (node.name or "").startswith("attnrewrite/")
            or all(is_constant(o, const_memo) for o in node.outputs)
        )

    outputs: list[ir.Value] = []
    for site in sites:
        for value in _site_outputs(site):
            if value not in outputs:
                outputs.append(value)
    try:
        results = _run_cut(model, outputs, inside)
    except RuntimeError:
        # Random feeds at the cut give every symbolic axis one size, which cannot satisfy sites whose
        # inputs tie axes together (DeBERTa: Q/K/V folded to [B·h, N, d] beside a [B, 1, N, T] mask,
        # then `view(-1, h, N, T)`); the model's own prefix from its inputs keeps them consistent.
        results = _run_cut(model, outputs, None)
    failures = {}
    for site in sites:
        reason = _compare(site, results)
        if reason:
            failures[site.id] = reason
    return failures


#: From the model's own inputs a dynamic image side of 2 or 1 pixels cannot pass a patch conv: the
#: prefix run also tries sizes an image or a sequence can have (the batch axis stays at 2 or 1).
_PREFIX_SIZES = (2, 1, 64, 224)


def _run_cut(model: ir.Model, outputs: list[ir.Value], inside) -> dict[str, np.ndarray]:
    """`outputs` computed on random feeds from the values where `inside` stops (None: the graph inputs)."""
    proto, _ = build_submodel(model.graph, outputs, inside)
    _bypass_fake_quant(proto)
    session = cpu_session(proto.SerializeToString())
    last_error: Exception | None = None
    for size in _DYNAMIC_SIZES if inside is not None else _PREFIX_SIZES:
        feeds = _random_feeds(session, size, seed=0, batch=None if inside is not None else min(size, 2))
        try:
            return dict(zip([o.name for o in outputs], session.run([o.name for o in outputs], feeds)))
        except Exception as exc:  # noqa: BLE001 - try the next size for symbolic dims
            last_error = exc
    raise RuntimeError(ort_message(last_error))


def _bypass_fake_quant(proto) -> int:
    """Turn every activation `DequantizeLinear(QuantizeLinear(x))` of the check's copy into `Identity(x)`.

    QDQ models round activations to ranges calibrated on real data; the random inputs of the check
    fall outside them and saturate, so the quantised copy says nothing about whether the site was
    read right. Without the rounding the site is exactly the float maths detection describes.
    """
    producers = {out: node for node in proto.graph.node for out in node.output}
    bypassed = 0
    for node in proto.graph.node:
        quant = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if quant is None or quant.op_type != "QuantizeLinear":
            continue
        source, output = quant.input[0], node.output[0]
        node.ClearField("input")
        node.ClearField("attribute")
        node.op_type, node.domain = "Identity", ""
        node.input.append(source)
        assert node.output[0] == output
        bypassed += 1
    return bypassed


def _compare(site: AttentionSite, results: dict[str, np.ndarray]) -> str | None:
    # the first two instances are enough to catch a misreading and keep big models cheap
    q, k, v = (_head(results[x.name]) for x in (site.q, site.k, site.v))
    bias = _bias_head(results[site.bias.name], q.ndim) if site.bias is not None else None
    try:
        expected = reference_attention(q, k, v, site.scale, bias)
        actual = _head(output_as_bhnd(site.output_layout, site.num_heads, results[site.output.name])).astype(np.float32)
    except ValueError as exc:
        return f"numerical check failed: shapes do not match the site's reading ({ort_message(exc)})"
    if expected.shape != actual.shape:
        return f"numerical check failed: output shape {actual.shape} != expected {expected.shape}"
    both_nan = np.isnan(expected) & np.isnan(actual)
    if np.any(np.isnan(expected) != np.isnan(actual)):
        return "numerical check failed: NaN pattern differs from softmax(scale·QKᵀ+bias)·V"
    diff = np.where(both_nan, 0.0, expected - actual)
    ref = np.where(both_nan, 0.0, expected)
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
    tolerance = tolerance_for(results[site.output.name].dtype)
    if not rel <= tolerance:
        return f"numerical check failed: relative error {rel:.2e} vs softmax(scale·QKᵀ+bias)·V (tolerance {tolerance:g})"
    return None


def _head(x: np.ndarray, count: int = 2) -> np.ndarray:
    return x[:count] if x.ndim >= 3 and x.shape[0] > count else x


def _bias_head(bias: np.ndarray, rank: int, count: int = 2) -> np.ndarray:
    """The bias rows of the instances `_head` kept. A bias broadcasts from the right, so only one of the
    scores' full rank has the batch in front: LeViT's [heads, q, k] table must not be cut to 2 heads."""
    return _head(bias, count) if bias.ndim == rank else bias


def _random_feeds(session: ort.InferenceSession, dynamic: int, seed: int, batch: int | None = None) -> dict[str, np.ndarray]:
    """Random inputs with every symbolic axis at `dynamic` (the first at `batch` when given)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else (batch if axis == 0 and batch else dynamic)
                 for axis, d in enumerate(inp.shape)]
        kind = inp.type
        if "float" in kind:
            dtype = numpy_dtype_of_ort(kind) or np.float32
            feeds[inp.name] = (rng.random(shape, dtype=np.float32) * 4 - 2).astype(dtype, copy=False)
        elif kind == "tensor(bool)":
            arr = rng.random(shape) < 0.8
            if arr.ndim:
                arr[..., 0] = True
            feeds[inp.name] = arr
        else:
            dtype = {"tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}.get(kind, np.int64)
            arr = (rng.random(shape) < 0.8).astype(dtype)
            if arr.ndim:
                arr[..., 0] = 1
            feeds[inp.name] = arr
    return feeds
