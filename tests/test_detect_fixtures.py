"""Detection and rewriting on real exports: every fixture × exporter, against what the model is built from.

`tests/test_fixtures.py` proves the fixtures' metadata matches what torch computes; here the detector's
`AttentionSite`s must match that metadata field by field, canonicalisation must not move any output, and
the spatial passes must rewrite the vision exports into valid models that keep their I/O.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="the model fixtures need torch (pip install -e '.[torch]')")

from attnrewrite.onnx.analysis import analyze  # noqa: E402
from attnrewrite.onnx.canonicalize import canonicalize  # noqa: E402
from attnrewrite.onnx.modelio import load_model  # noqa: E402
from tests.conftest import ort_run  # noqa: E402
from tests.fixtures import EXPORTERS, FIXTURES  # noqa: E402
from tests.test_cli_pipeline import run  # noqa: E402

NAMES = sorted(FIXTURES)
ATTENTION = [n for n in NAMES if FIXTURES[n].family != "negative"]
NEGATIVES = [n for n in NAMES if FIXTURES[n].family == "negative"]
FIELDS = ("num_heads", "head_dim", "q_len", "kv_len", "kind", "bias", "grid", "prefix_tokens", "window", "rotary")


def _expected_instances(meta) -> int:
    """Dynamic batch: `instances` counts per batch element (windows per image, 1 for global attention)."""
    if meta.instances is not None:
        return meta.instances
    if meta.window and meta.grid:
        return (meta.grid[0] // meta.window[0]) * (meta.grid[1] // meta.window[1])
    return 1


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ATTENTION)
def test_sites_match_the_model(exported, name, exporter):
    exp = exported(name, exporter)
    analysis = analyze(exp.path)
    doc = analysis.to_json()
    assert len(doc["sites"]) == len(exp.meta.sites), doc["rejected"]
    assert not doc["rejected"] or exp.meta.non_attention_softmax, doc["rejected"]
    for got, meta in zip(doc["sites"], exp.meta.sites):
        want = meta.to_json()
        assert {f: got[f] for f in FIELDS} == {f: want[f] for f in FIELDS}, got["id"]
        assert got["instances"] == _expected_instances(meta), got["id"]
        assert got["verified"] and got["nodes"], got["id"]
        constant_query = got["kind"] == "cross" and not _query_depends_on_inputs(analysis, got["id"])
        if not constant_query:
            assert math.isclose(got["scale"], want["scale"], rel_tol=1e-5), (got["id"], got["scale"], want["scale"])
        # A learned query is folded with its share of the scale (√s·q becomes one constant), so the
        # remaining factor differs from the model's; the numerical verification above is the check.


def _query_depends_on_inputs(analysis, site_id: str) -> bool:
    site = next(s for s in analysis.sites if s.id == site_id)
    seen, stack = set(), [site.q]
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_input():
            return True
        if value.producer() is not None:
            stack.extend(value.producer().inputs)
    return False


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NEGATIVES)
def test_softmax_that_is_not_attention_is_rejected(exported, name, exporter):
    exp = exported(name, exporter)
    doc = analyze(exp.path).to_json()
    assert doc["sites"] == []
    assert len(doc["rejected"]) == exp.meta.non_attention_softmax
    assert all(r["reason"] for r in doc["rejected"])


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_canonicalisation_keeps_outputs(exported, name, exporter, tmp_path):
    exp = exported(name, exporter)
    feeds, _ = exp.reference()
    before = ort_run(exp.path, feeds)
    model = canonicalize(load_model(exp.path))
    out = tmp_path / "canonical.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(_to_proto(model)), out)
    after = ort_run(out, feeds)
    assert before.keys() == after.keys()
    for key in before:
        assert np.abs(after[key].astype(np.float64) - before[key]).max() <= 1e-5, key


def _to_proto(model):
    import onnx_ir as ir

    return ir.serde.serialize_model(model)


def _io(path):
    graph = onnx.load(path, load_external_data=False).graph

    def sig(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    return sig(graph.input), sig(graph.output)


def _rewrite(capsys, path, tmp_path, spec):
    out = tmp_path / "rewritten.onnx"
    rc, stdout, err = run(capsys, path, "--pass", spec, "-o", out, "--force", "--json", "--samples", "4")
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert _io(out) == _io(path)
    return json.loads(stdout)["passes"][0], out


VISION = ["vit_fused", "vit_manual_rect", "vit_packed_fused", "vit_parallel_rect", "vit_rotary", "vit_relpos_rect",
          "deit_tiny", "dinov2_reg4_rect", "vit_mha", "vit_einsum_rect", "hf_vit_rect", "hf_deit", "hf_dinov2_reg", "hf_clip_vision"]


@pytest.mark.parametrize("exporter", ["torchscript17", "dynamo23"])
@pytest.mark.parametrize("name", VISION)
def test_vision_exports_take_spatial_passes(capsys, exported, name, exporter, tmp_path):
    exp = exported(name, exporter)
    grid = exp.meta.sites[0].grid
    whole = f"{grid[0]}x{grid[1]}"
    anchor, _ = _rewrite(capsys, exp.path, tmp_path, f"window:size={whole}")
    assert len(anchor["rewritten"]) == len(exp.meta.sites)
    for metrics in anchor["metrics_vs_original"].values():
        assert metrics["rel_l2"] <= 1e-5, metrics
    half = f"{max(grid[0] // 2, 1)}x{max(grid[1] // 2, 1)}"
    for spec in (f"window:size={half},shift=alternate", "neighborhood:kernel=3"):
        lossy, _ = _rewrite(capsys, exp.path, tmp_path, spec)
        assert len(lossy["rewritten"]) == len(exp.meta.sites), lossy["sites"]
        assert all(s["local"]["rel_l2"] > 1e-4 for s in lossy["sites"]), spec  # sharpened: sparsity shows


@pytest.mark.parametrize("name", ["vit_fused", "hf_vit_sdpa", "minilm"])
def test_onnx_attention_op_sites_take_every_pass_family(capsys, exported, name, tmp_path):
    """Opset-23 exports turn SDPA into the ONNX Attention op: unmasked sites count as per-key (linear
    applies) and a boolean mask becomes a typed, shaped bias the spatial passes can lay out."""
    exp = exported(name, "dynamo23")
    assert "Attention" in {n.op_type for n in onnx.load(exp.path).graph.node}
    lossy = "window:size=4" if exp.meta.sites[0].grid is None else "neighborhood:kernel=3"
    for spec in ("linear", lossy):
        p, _ = _rewrite(capsys, exp.path, tmp_path, spec)
        assert len(p["rewritten"]) == len(exp.meta.sites), (spec, p["sites"])


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["hf_swin", "hf_swinv2"])
def test_swin_is_narrowed_or_left_alone(capsys, exported, name, exporter, tmp_path):
    exp = exported(name, exporter)
    window = exp.meta.sites[0].window
    alone, _ = _rewrite(capsys, exp.path, tmp_path, f"window:size={window[0]}x{window[1]}")
    assert alone["rewritten"] == []
    assert all("already attends" in s["reason"] for s in alone["sites"])
    narrowed, _ = _rewrite(capsys, exp.path, tmp_path, f"window:size={window[0] // 2}x{window[1] // 2}")
    assert len(narrowed["rewritten"]) == len(exp.meta.sites)
    assert all(s["local"]["rel_l2"] > 1e-4 for s in narrowed["sites"])


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_learned_query_pooling_is_not_windowed(capsys, exported, exporter, tmp_path):
    exp = exported("vit_map_pool", exporter)
    p, _ = _rewrite(capsys, exp.path, tmp_path, "window:size=4x4")
    status = {s["id"]: (s["status"], s["reason"]) for s in p["sites"]}
    cross = [i for i, m in enumerate(exp.meta.sites) if m.kind == "cross"]
    assert len(p["rewritten"]) == len(exp.meta.sites) - len(cross)
    for i in cross:
        assert status[f"attn_{i}"][0] == "skipped" and "cross-attention" in status[f"attn_{i}"][1]


class _DynamicHeadDimViT(torch.nn.Module):
    """What a timm-style ViT looks like through TorchScript with a dynamic batch: `c // heads` and
    `cls.expand(x.shape[0], -1, -1)` become Shape → Div and Shape → Equal → Where → Expand chains."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.patch = torch.nn.Conv2d(3, dim, 4, 4)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.qkv, self.proj, self.head = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.head(self.proj((a @ v).transpose(1, 2).reshape(b, n, c))[:, 0])


def test_dynamic_batch_torchscript_shape_chains_resolve(capsys, tmp_path):
    import warnings

    path = tmp_path / "dyn.onnx"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_DynamicHeadDimViT().eval(), (torch.randn(1, 3, 24, 32),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    site = analyze(path).to_json()["sites"][0]
    assert (site["head_dim"], site["q_len"], site["grid"], site["prefix_tokens"]) == (8, 49, [6, 8], 1)
    p, _ = _rewrite(capsys, path, tmp_path, "neighborhood:kernel=3")
    assert p["rewritten"] == ["attn_0"]


@pytest.mark.parametrize("exporter", EXPORTERS)  # dynamo23: the ONNX Attention op with a boolean mask
def test_dynamic_length_text_takes_sliding_windows(capsys, exported, exporter, tmp_path):
    """Text exports keep the sequence axis symbolic; the rewritten graph must serve every length."""
    exp = exported("minilm_dynamic", exporter)

    def shapes(spec):
        return [arg for name in exp.input_names for arg in ("--shape", f"{name}={spec}")]

    def rewrite(spec, out):
        rc, stdout, err = run(capsys, exp.path, "--pass", spec, "-o", out, "--json", *shapes("2x16"))
        assert rc == 0, err
        onnx.checker.check_model(onnx.load(out), full_check=True)
        assert _io(out) == _io(exp.path)
        return json.loads(stdout)["passes"][0]

    anchor = rewrite("neighborhood:kernel=512", tmp_path / "anchor.onnx")  # longer than any sequence used
    assert len(anchor["rewritten"]) == len(exp.meta.sites)
    lossy = rewrite("window:size=4", tmp_path / "window.onnx")
    assert len(lossy["rewritten"]) == len(exp.meta.sites)
    assert all(s["local"]["rel_l2"] > 1e-3 for s in lossy["sites"])
    for length in ("1x5", "3x29"):  # other lengths than the calibration's, one shorter than the window
        rc, stdout, err = run(capsys, "audit", exp.path, tmp_path / "anchor.onnx", "--json", *shapes(length))
        assert rc == 0, err
        metrics = json.loads(stdout)["model_metrics"].values()
        assert all(m["max_abs"] <= 1e-5 for m in metrics), (length, metrics)
    rc, stdout, err = run(capsys, "audit", exp.path, tmp_path / "window.onnx", "--json", *shapes("3x29"))
    assert rc == 1, err  # audit's default budget (cosine>=0.999) is blown by a 4-token window
    assert json.loads(stdout)["model_metrics"]["last_hidden_state"]["cosine"] < 0.999
    dilated = rewrite("neighborhood:kernel=3,dilation=2", tmp_path / "dilated.onnx")
    assert dilated["rewritten"] == [] and "static sequence length" in dilated["sites"][0]["reason"]


def test_half_precision_export_is_found_and_rewritten(capsys, tmp_path):
    """fp16 exports: verification allows fp16 rounding, and every pass emits fp16 constants."""
    from tests.fixtures.export import export_model

    built = FIXTURES["vit_manual_rect"].build()
    path = export_model(built.model.half(), tuple(x.half() for x in built.inputs), tmp_path / "fp16.onnx",
                        "torchscript17", built.input_names, built.output_names)
    doc = analyze(path).to_json()
    assert len(doc["sites"]) == len(built.meta.sites) and all(s["verified"] for s in doc["sites"]), doc["rejected"]
    grid = built.meta.sites[0].grid
    for spec in ("sdpa", "sdpa:fuse=ort", "linear:prefix=exact,fit=ridge", f"window:size={grid[0]}x{grid[1]}",
                 "neighborhood:kernel=3", "halo:block=2,halo=1"):
        p, out = _rewrite(capsys, path, tmp_path, spec)
        assert len(p["rewritten"]) == len(built.meta.sites), (spec, p["sites"])
        if spec.startswith("sdpa") or spec.startswith("window"):
            assert all(m["cosine"] > 0.9999 for m in p["metrics_vs_original"].values()), spec


@pytest.mark.parametrize("fused_op", ["Attention", "MultiHeadAttention"])
def test_ort_transformer_optimizer_output(capsys, tmp_path, fused_op):
    """What deployment pipelines hand us after `onnxruntime.transformers.optimizer`: contrib Attention with
    packed QKV weights (or MultiHeadAttention with a key padding mask), fed end positions by
    EmbedLayerNormalization, no shape information."""
    import transformers as tf
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    from tests.fixtures.export import export_model
    from tests.fixtures.hf import Outputs, padded_text_inputs
    from tests.fixtures.spec import seeded

    heads, hidden, layers = 4, 64, 2
    cfg = tf.BertConfig(vocab_size=200, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=128)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    names = ["input_ids", "attention_mask"]
    model = Outputs(tf.BertModel(cfg), names, ["last_hidden_state"]).eval()
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    exported_path = export_model(model, padded_text_inputs(cfg.vocab_size, seeded(0)), tmp_path / "bert.onnx",
                                 "torchscript17", names, ["last_hidden_state"], axes)
    options = FusionOptions("bert")
    options.use_multi_head_attention = fused_op == "MultiHeadAttention"
    optimized = optimizer.optimize_model(str(exported_path), model_type="bert", num_heads=heads, hidden_size=hidden,
                                         optimization_options=options)
    path = tmp_path / "bert_ort.onnx"
    optimized.save_model_to_file(str(path))
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {fused_op, "EmbedLayerNormalization"} <= ops and "Softmax" not in ops, ops
    doc = analyze(path).to_json()
    assert len(doc["sites"]) == layers, doc["rejected"]
    assert all(s["op"] == f"com.microsoft.{fused_op}" and s["bias"] == "input" and s["verified"] for s in doc["sites"])
    shapes = [arg for name in names for arg in ("--shape", f"{name}=2x16")]
    for spec, exact in (("sdpa", True), ("sdpa:fuse=ort", True), ("neighborhood:kernel=64", True), ("window:size=4", False)):
        out = tmp_path / "o.onnx"
        rc, stdout, err = run(capsys, path, "--pass", spec, "-o", out, "--force", "--json", *shapes)
        assert rc == 0, (spec, err)
        p = json.loads(stdout)["passes"][0]
        assert len(p["rewritten"]) == layers, (spec, p["sites"])
        worst = max(m["max_abs"] for m in p["metrics_vs_original"].values())
        assert (worst <= 1e-5) if exact else (worst > 1e-3), (spec, worst)


@pytest.mark.parametrize("name,model_type", [("hf_vit", "vit"), ("hf_deit", "vit"), ("hf_clip_vision", "clip"), ("hf_bert", "bert")])
def test_sites_survive_ort_fused_layernorm_and_gelu(exported, name, model_type, tmp_path):
    """ORT's optimizer often fuses LayerNorm/GELU (contrib ops ONNX shape inference does not know) but
    leaves attention as MatMul/Softmax: every later site must still be read in full."""
    from onnxruntime.transformers import optimizer

    exp = exported(name, "torchscript17")
    site = exp.meta.sites[0]
    optimized = optimizer.optimize_model(str(exp.path), model_type=model_type, num_heads=site.num_heads,
                                         hidden_size=site.num_heads * site.head_dim)
    path = tmp_path / "optimized.onnx"
    optimized.save_model_to_file(str(path))
    graph = onnx.load(path).graph
    assert any(n.domain == "com.microsoft" for n in graph.node)
    doc = analyze(path).to_json()
    assert len(doc["sites"]) == len(exp.meta.sites), doc["rejected"]
    for got, meta in zip(doc["sites"], exp.meta.sites):
        want = meta.to_json()
        assert {f: got[f] for f in FIELDS} == {f: want[f] for f in FIELDS}, got["id"]


@pytest.mark.parametrize("name", ["vit_manual_rect", "hf_deit"])
def test_qdq_quantised_model_is_read_and_audited(capsys, exported, name, tmp_path):
    """onnxruntime's static QDQ quantisation wraps logits, probabilities and K in Quantize/Dequantize
    pairs and quantises the scale constant; the sites must still be read (and paired by `audit`)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    exp = exported(name, "torchscript17")
    feeds, _ = exp.reference()

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.batches = [feeds]

        def get_next(self):
            return self.batches.pop() if self.batches else None

    path = tmp_path / "qdq.onnx"
    quantize_static(str(exp.path), str(path), Feeds(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(path).graph.node}
    doc = analyze(path).to_json()
    assert len(doc["sites"]) == len(exp.meta.sites), doc["rejected"]
    for got, meta in zip(doc["sites"], exp.meta.sites):
        want = meta.to_json()
        assert {f: got[f] for f in FIELDS} == {f: want[f] for f in FIELDS}, got["id"]
        assert got["verified"] and any("QDQ" in note for note in got["notes"]), got
    rc, stdout, err = run(capsys, "audit", exp.path, path, "--json")
    assert rc == 1, err  # int8 rounding of a sharpened random-init model blows the default 0.999 budget
    report = json.loads(stdout)
    assert len(report["sites"]) == len(exp.meta.sites)
    assert all(0.0 < s["cosine"] < 0.9999 for s in report["sites"])  # per-site drift is measured


@pytest.mark.parametrize("name", ["hf_bert", "hf_vit", "vit_manual_rect"])  # SDPA needs opset 14
def test_opset_11_exports(capsys, name, tmp_path):
    """Older deployments ship opset 11/12: LayerNorm spelled out, Softmax with pre-13 semantics. Sites must
    read the same as at opset 17, and a rewrite must produce a valid model at the model's own opset."""
    import warnings

    built = FIXTURES[name].build()
    path = tmp_path / "op11.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(built.model.eval(), built.inputs, str(path), dynamo=False, opset_version=11,
                          input_names=built.input_names, output_names=built.output_names)
    doc = analyze(path).to_json()
    assert len(doc["sites"]) == len(built.meta.sites), doc["rejected"]
    for got, meta in zip(doc["sites"], built.meta.sites):
        want = meta.to_json()
        assert {f: got[f] for f in FIELDS} == {f: want[f] for f in FIELDS}, got["id"]
    spec = "window:size=4" if built.meta.sites[0].grid is None else "neighborhood:kernel=3"
    p, _ = _rewrite(capsys, path, tmp_path, spec)
    assert len(p["rewritten"]) == len(built.meta.sites)


class _QKNormViT(torch.nn.Module):
    """q/k normalisation per head (DiT, SD3, EVA, ViT-22B): LayerNorm or RMSNorm over the head dim of Q and K."""

    def __init__(self, norm: str, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.patch, self.cls = torch.nn.Conv2d(3, dim, 4, 4), torch.nn.Parameter(torch.randn(1, 1, dim))
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        make = torch.nn.LayerNorm if norm == "layer" else torch.nn.RMSNorm
        self.q_norm, self.k_norm = make(dim // heads), make(dim // heads)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = torch.nn.functional.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("norm,exporter", [("layer", "torchscript17"), ("layer", "dynamo18"), ("rms", "dynamo23")])
def test_qk_norm_is_self_attention(capsys, norm, exporter, tmp_path):
    """Normalising Q and K separately must not make the site look like cross-attention (spatial passes
    skip cross-attention), whichever normalisation op the exporter writes."""
    from tests.fixtures.export import export_model

    torch.manual_seed(0)
    path = export_model(_QKNormViT(norm).eval(), (torch.randn(2, 3, 32, 24),), tmp_path / "qk.onnx", exporter,
                        ["x"], ["y"])
    (site,) = analyze(path).to_json()["sites"]
    assert (site["kind"], site["grid"], site["prefix_tokens"], site["num_heads"]) == ("self", [8, 6], 1, 4), site
    p, _ = _rewrite(capsys, path, tmp_path, "window:size=4x3")
    assert p["rewritten"] == ["attn_0"]


class _SpatialTransformer(torch.nn.Module):
    """A diffusion UNet's transformer block: conv feature map → GroupNorm → proj_in → H·W tokens → attention.
    There is no patch embedding; the token grid is the feature map's."""

    def __init__(self, linear_proj: bool, c=32, heads=4):
        super().__init__()
        self.conv_in, self.norm = torch.nn.Conv2d(4, c, 3, padding=1), torch.nn.GroupNorm(8, c)
        self.linear_proj, self.heads = linear_proj, heads
        self.proj_in = torch.nn.Linear(c, c) if linear_proj else torch.nn.Conv2d(c, c, 1)
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(c, c) for _ in range(4))

    def forward(self, x):
        h = self.conv_in(x)
        b, c, H, W = h.shape
        t = self.norm(h)
        if self.linear_proj:  # diffusers' use_linear_projection
            t = self.proj_in(t.permute(0, 2, 3, 1).reshape(b, H * W, c))
        else:
            t = self.proj_in(t).view(b, c, H * W).transpose(1, 2)
        q, k, v = (f(t).view(b, -1, self.heads, c // self.heads).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        return self.to_out(o).transpose(1, 2).reshape(b, c, H, W) + h


class _TwoLayerText(torch.nn.Module):
    """Text whose head merge `[B, 16, 2, 8] → [B, 16, 16]` has the shapes of a 4×4 feature-map flatten."""

    def __init__(self, vocab=50, dim=16, heads=2):
        super().__init__()
        self.embed, self.heads = torch.nn.Embedding(vocab, dim), heads
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(2))

    def forward(self, ids):
        t = self.embed(ids)
        b, n, c = t.shape
        for qkv in self.layers:
            q, k, v = qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            t = t + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return t


@pytest.mark.parametrize("linear_proj", [False, True])
@pytest.mark.parametrize("exporter", ["torchscript17", "dynamo18"])
def test_unet_feature_map_is_the_token_grid(capsys, linear_proj, exporter, tmp_path):
    from tests.fixtures.export import export_model

    torch.manual_seed(0)
    path = export_model(_SpatialTransformer(linear_proj).eval(), (torch.randn(2, 4, 12, 16),), tmp_path / "unet.onnx",
                        exporter, ["x"], ["y"])
    (site,) = analyze(path).to_json()["sites"]
    assert (site["kind"], site["grid"], site["prefix_tokens"]) == ("self", [12, 16], 0), site
    p, _ = _rewrite(capsys, path, tmp_path, "neighborhood:kernel=5")
    assert p["rewritten"] == ["attn_0"]


def test_head_merge_is_not_a_feature_map(tmp_path):
    from tests.fixtures.export import export_model

    torch.manual_seed(0)
    path = export_model(_TwoLayerText().eval(), (torch.randint(0, 50, (2, 16)),), tmp_path / "text.onnx",
                        "torchscript17", ["ids"], ["y"])
    sites = analyze(path).to_json()["sites"]
    assert len(sites) == 2 and all(s["grid"] is None and s["prefix_tokens"] is None for s in sites), sites


class _ExtraTokensViT(torch.nn.Module):
    """One attention block over [cls, patches, det] (YOLOS, `suffix=True`) or [cls, det, patches]; the
    output is put back in one canonical order, so both layouts compute the same function."""

    def __init__(self, suffix: bool, dim=32, heads=4, extra=3):
        super().__init__()
        self.suffix, self.heads, self.extra = suffix, heads, extra
        self.patch, self.cls = torch.nn.Conv2d(3, dim, 4, 4), torch.nn.Parameter(torch.randn(1, 1, dim))
        self.det = torch.nn.Parameter(torch.randn(1, extra, dim))
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        with torch.no_grad():
            self.qkv.weight.mul_(4.0)  # far from uniform attention, so a misplaced window shows

    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)
        b, g, c = p.shape
        cls, det = self.cls.expand(b, -1, -1), self.det.expand(b, -1, -1)
        t = torch.cat([cls, p, det] if self.suffix else [cls, det, p], 1)
        q, k, v = self.qkv(t).reshape(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c))
        if self.suffix:
            return o
        return torch.cat([o[:, :1], o[:, 1 + self.extra:], o[:, 1:1 + self.extra]], 1)  # to [cls, patches, det]


def test_tokens_after_the_grid_keep_their_geometry(capsys, tmp_path):
    """YOLOS appends detection tokens after the patches. Rewritten, the suffix layout must compute exactly
    what the prefix layout computes: the window pass must not mistake detection tokens for grid cells."""
    from tests.fixtures.export import export_model

    x = torch.randn(2, 3, 24, 32)
    outs = {}
    for suffix in (True, False):
        torch.manual_seed(0)
        model = _ExtraTokensViT(suffix).eval()
        path = export_model(model, (x,), tmp_path / f"m{suffix}.onnx", "torchscript17", ["x"], ["y"])
        (site,) = analyze(path).to_json()["sites"]
        assert (site["grid"], site["prefix_tokens"], site["suffix_tokens"]) == ([6, 8], 1 + 3 * (not suffix), 3 * suffix)
        p, out = _rewrite(capsys, path, tmp_path, "window:size=3x4")
        assert p["rewritten"] == ["attn_0"]
        outs[suffix] = ort_run(out, {"x": x.numpy()})["y"]
    assert np.abs(outs[True] - outs[False]).max() <= 1e-5
