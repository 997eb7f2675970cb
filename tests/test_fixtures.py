"""The model fixtures are what they claim: exports load and match torch, and the metadata matches the model.

Detector tests assert against `FixtureMeta`, so the metadata is checked here against what torch really
computes (the shape of every softmax / SDPA call), and every export is checked against torch's outputs.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="the model fixtures need torch (pip install -e '.[torch]')")

from tests.conftest import ort_session, relative_max_error  # noqa: E402
from tests.fixtures import EXPORTERS, FIXTURES, export as export_mod, sharpen_attention  # noqa: E402
from tests.fixtures.probe import record  # noqa: E402

NAMES = sorted(FIXTURES)
ATTENTION_NAMES = [n for n in NAMES if FIXTURES[n].family != "negative"]
_OPSET = {"torchscript17": 17, "dynamo18": 18, "dynamo23": 23}


@pytest.fixture(scope="module")
def built():
    """Build each fixture once per worker (MiniLM loads real weights)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = FIXTURES[name].build()
        return cache[name]

    return get


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_export_loads_and_matches_torch(exported, name, exporter):
    exp = exported(name, exporter)
    proto = onnx.load(str(exp.path))
    onnx.checker.check_model(proto, full_check=True)
    opset = {o.domain: o.version for o in proto.opset_import}.get("", 0)
    assert opset == _OPSET[exporter], f"{name}/{exporter}: default-domain opset {opset}"

    sess = ort_session(exp.path)
    assert [i.name for i in sess.get_inputs()] == exp.input_names
    assert [o.name for o in sess.get_outputs()] == exp.output_names
    feeds, ref = exp.reference()
    got = dict(zip(exp.output_names, sess.run(exp.output_names, feeds)))
    tol = FIXTURES[name].rtol
    for out_name, want in ref.items():
        assert got[out_name].shape == want.shape, f"{name}/{exporter}/{out_name}: {got[out_name].shape} != {want.shape}"
        err = relative_max_error(got[out_name], want)
        assert err <= tol, f"{name}/{exporter}/{out_name}: ORT vs torch max-abs error {err:.3g} x max|ref| > {tol}"


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_export_has_one_anchor_per_softmax(exported, name, exporter):
    """Each site (and each non-attention softmax) is exactly one Softmax or ONNX Attention node."""
    exp = exported(name, exporter)
    ops = [n.op_type for n in onnx.load(str(exp.path)).graph.node]
    anchors = ops.count("Softmax") + ops.count("Attention")
    want = exp.meta.num_sites + exp.meta.non_attention_softmax
    assert anchors == want, f"{name}/{exporter}: {ops.count('Softmax')} Softmax + {ops.count('Attention')} Attention, want {want}"
    # opset 23 turns every F.scaled_dot_product_attention into the ONNX Attention op; nothing else does
    fused = exporter == "dynamo23" and exp.meta.attention_impl in ("sdpa", "hf_sdpa", "mha")
    want_attention = exp.meta.num_sites if fused else 0
    assert ops.count("Attention") == want_attention, f"{name}/{exporter}: {ops.count('Attention')} Attention ops"


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("_dynamic")])
def test_dynamic_exports_have_symbolic_axes(exported, name):
    for exporter in EXPORTERS:
        exp = exported(name, exporter)
        graph = onnx.load(str(exp.path)).graph
        for inp in graph.input:
            dims = inp.type.tensor_type.shape.dim
            assert all(d.dim_param and not d.HasField("dim_value") for d in dims[:2]), f"{name}/{exporter}: {inp}"


UNSUPPORTED = [(n, e) for n in NAMES for e, _ in FIXTURES[n].unsupported.items()]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "exporter"), UNSUPPORTED)
def test_unsupported_exports_still_fail(tmp_path, built, name, exporter):
    """A combination marked unsupported must really fail; when torch/transformers fix it, unmark it."""
    b = built(name)
    with pytest.raises(export_mod.ExportFailed):
        export_mod.export_model(b.model, b.inputs, tmp_path / "m.onnx", exporter, b.input_names, b.output_names,
                                b.dynamic_axes)


def _match(site, call, name):
    """Check one recorded torch call against a SiteMeta; returns a failure message or None."""
    if call.dim != len(call.shape) - 1:
        return f"{name}: softmax over axis {call.dim} of {call.shape}, not the key axis"
    if len(call.shape) == 4:
        lead, heads, nq, nk = call.shape
    elif len(call.shape) == 3:  # nn.MultiheadAttention with need_weights: [B·h, Nq, Nk]
        (bh, nq, nk), heads = call.shape, site.num_heads
        lead = bh // heads if bh % heads == 0 else None
    elif len(call.shape) == 5:  # Hiera's mask units: [B, h, units, Nq, Nk], each unit an instance
        b, heads, units, nq, nk = call.shape
        lead = b * units
    else:
        return f"{name}: rank-{len(call.shape)} attention probabilities {call.shape}"
    want = (site.instances, site.num_heads, site.q_len, site.kv_len)
    got = (lead, heads, nq, nk)
    if any(w is not None and w != g for w, g in zip(want, got)):
        return f"{name}: torch attends over (instances, heads, q, kv)={got}, metadata says {want}"
    if call.q_shape is not None and call.q_shape[-1] != site.head_dim:
        return f"{name}: torch head_dim {call.q_shape[-1]}, metadata {site.head_dim}"
    if call.scale is not None and not np.isclose(call.scale, site.scale, rtol=1e-6):
        return f"{name}: torch scale {call.scale}, metadata {site.scale}"
    return None


@pytest.mark.parametrize("name", NAMES)
def test_metadata_matches_what_torch_computes(built, name):
    b = built(name)
    calls = record(b.model, b.inputs)
    meta = b.meta
    assert len(calls) == meta.num_sites + meta.non_attention_softmax, (
        f"{name}: torch made {len(calls)} softmax/SDPA calls {[c.shape for c in calls]}, metadata says "
        f"{meta.num_sites} sites + {meta.non_attention_softmax} other softmaxes")
    if not meta.sites:
        return
    assert meta.non_attention_softmax == 0, f"{name}: mixes sites and other softmaxes; match them by position"
    failures = [msg for site, call in zip(meta.sites, calls) if (msg := _match(site, call, name))]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", ATTENTION_NAMES)
def test_metadata_is_self_consistent(built, name):
    """Grid, prefix and window agree with the token counts, and the grid has the input's aspect ratio."""
    b = built(name)
    for i, s in enumerate(b.meta.sites):
        # cosine attention has a learned temperature; Whisper scales Q before the head split; DeBERTa
        # divides by √d once per disentangled term (content, c2p, p2c)
        scale = {"hf_cosine": 1.0, "hf_scaled_q": 1.0, "hf_deberta": (3 * s.head_dim) ** -0.5}.get(
            b.meta.attention_impl, s.head_dim ** -0.5)
        assert s.num_heads > 0 and s.head_dim > 0 and np.isclose(s.scale, scale), (name, i, s)
        if s.grid is None:
            assert s.prefix_tokens is None and s.window is None, (name, i, s)
            continue
        gh, gw = s.grid[-2:]  # video grids are (frames, H, W)
        image = b.inputs[0].shape[-2:]
        assert gh * image[1] == gw * image[0], f"{name} site {i}: grid {s.grid} vs input {tuple(image)}"
        if s.window is not None:
            wh, ww = s.window
            assert (s.q_len, s.kv_len, s.prefix_tokens) == (wh * ww, wh * ww, 0), (name, i, s)
            assert s.instances == b.inputs[0].shape[0] * (gh // wh) * (gw // ww), (name, i, s)
        else:
            tokens = s.q_len if s.kind == "self" else s.kv_len
            assert tokens == math.prod(s.grid) + s.prefix_tokens, f"{name} site {i}: {tokens} tokens != grid {s.grid} + prefix"
            if s.kind == "cross":
                assert s.q_len < s.kv_len, (name, i, s)


@pytest.mark.parametrize("name", ATTENTION_NAMES)
def test_attention_is_far_from_uniform(built, name):
    """Sharpened Q/K: every site's mean max-probability is several times uniform but not one-hot."""
    b = built(name)
    calls = record(b.model, b.inputs)
    for i, c in enumerate(calls):
        probs = c.probs.float()
        valid = probs.amax(-1) > 0  # skip fully masked rows, if any
        peak = float(probs.amax(-1)[valid].mean())
        uniform = 1.0 / c.shape[-1]
        assert 3 * uniform <= peak <= 0.95, f"{name} site {i}: mean max-probability {peak:.3f}, uniform {uniform:.3f}"


@pytest.mark.parametrize("name", ATTENTION_NAMES)
def test_outputs_depend_on_attention(built, name):
    """Uniform attention (Q/K zeroed) moves the outputs a lot: a broken rewrite cannot hide."""
    b = built(name)
    uniform = sharpen_attention(copy.deepcopy(b.model), 0.0)
    with torch.no_grad():
        ref, flat = b.model(*b.inputs), uniform(*b.inputs)
    ref, flat = (ref if isinstance(ref, tuple) else (ref,)), (flat if isinstance(flat, tuple) else (flat,))
    change = max(relative_max_error(f.numpy(), r.numpy()) for f, r in zip(flat, ref))
    assert change > 0.05, f"{name}: uniform attention changes the outputs by only {change:.3g} x max|ref|"


def test_every_vision_vit_has_a_non_square_twin():
    bases = [n for n in NAMES if FIXTURES[n].family == "vision" and not n.endswith("_rect")]
    assert bases and all(f"{n}_rect" in FIXTURES for n in bases), bases


def test_cache_reuses_an_export_and_keys_by_exporter(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "CACHE_DIR", tmp_path)
    first = export_mod.get("neg_classifier", "torchscript17")
    stamp = first.path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("re-exported a cached model")

    monkeypatch.setattr(export_mod, "export_model", fail)
    again = export_mod.get("neg_classifier", "torchscript17")
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp
    assert export_mod.cache_key("neg_classifier", "dynamo18") != export_mod.cache_key("neg_classifier", "torchscript17")
    assert sorted(p.suffix for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [".json", ".npz", ".onnx"]
