"""The torch front-end (`from attnrewrite import torch as art`): same sites, same passes, same math.

On timm-style ViTs (fused SDPA and hand-written softmax): `inspect` gives the SiteInfo the ONNX path
gives for the exported model; every supported pass, rewritten in torch and exported, equals the ONNX
path's rewrite of the exported original within 1e-5; the linear modules equal the numpy references
(fitted maps and the hybrid included) and train; the original module is never modified; bad input is
one sentence.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from attnrewrite import torch as art  # noqa: E402
from attnrewrite.errors import InputError  # noqa: E402
from attnrewrite.passes import linear as L  # noqa: E402
from attnrewrite.passes import linear_fit as LF  # noqa: E402
from attnrewrite.passes import linear_hybrid as H  # noqa: E402
from attnrewrite.registry import parse_pass  # noqa: E402
from attnrewrite.synthetic import lone_site  # noqa: E402
from attnrewrite.torch import modules as V  # noqa: E402
from tests.conftest import ort_run  # noqa: E402
from tests.fixtures.vision import ViT, ViTConfig  # noqa: E402


def _vit(attn="fused", registers=0, seed=0):
    torch.manual_seed(seed)
    return ViT(ViTConfig(attn=attn, registers=registers, depth=2), (64, 64)).eval()  # 8×8 grid of 8-px patches


def _inputs(n=1, seed=0):
    return (torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)),)


@pytest.mark.parametrize("attn,registers", [("fused", 0), ("manual", 0), ("fused", 4)])
def test_inspect_gives_the_onnx_paths_site_info(capsys, tmp_path, attn, registers):
    import json

    from attnrewrite.cli import main

    model = _vit(attn, registers)
    sites = art.inspect(model, _inputs())
    path = art.export(model, _inputs(), str(tmp_path / "m.onnx"))
    assert main(["inspect", path, "--json"]) == 0
    onnx_sites = json.loads(capsys.readouterr().out)["sites"]
    assert len(sites) == len(onnx_sites) == 2
    for a, b in zip(sites, onnx_sites):
        assert a.grid == tuple(b["grid"]) and a.prefix_tokens == b["prefix_tokens"] == 1 + registers
        for field in ("num_heads", "head_dim", "q_len", "kv_len", "kind"):
            assert getattr(a, field) == b[field], (field, getattr(a, field), b[field])
        assert a.bias_kind == b["bias"] and abs(a.scale - b["scale"]) < 1e-6


PASSES = ["sdpa", "window:size=4x4", "window:size=2x2,shift=alternate", "neighborhood:kernel=3,dilation=2",
          "grid:size=2", "halo:block=2,halo=1", "halo:block=4,halo=1,border=zero", "linear", "linear:phi=relu,prefix=exact"]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """The exported original per (attention style, registers), exported once for every pass."""
    cache = {}

    def get(attn, registers):
        if (attn, registers) not in cache:
            path = tmp_path_factory.mktemp("orig") / "orig.onnx"
            cache[attn, registers] = art.export(_vit(attn, registers), _inputs(), str(path))
        return cache[attn, registers]

    return get


@pytest.mark.parametrize("spec,attn", [(p, "fused") for p in PASSES] + [(p, "manual") for p in ("window:size=4x4", "linear")])
def test_exported_rewrite_equals_the_onnx_path(capsys, tmp_path, originals, spec, attn):
    from attnrewrite.cli import main

    registers = 2 if "window" in spec else 0
    model = _vit(attn, registers)
    new, report = art.rewrite(model, _inputs(), [spec], calib=[_inputs(2, seed=1)])
    assert report["passes"][0]["rewritten"] == ["attn_0", "attn_1"], report
    art.export(new, _inputs(), str(tmp_path / "torch.onnx"))
    rc = main([originals(attn, registers), "--pass", spec, "-o", str(tmp_path / "onnx.onnx"), "--json"])
    capsys.readouterr()
    assert rc == 0
    x = _inputs(3, seed=2)[0].numpy()
    got = list(ort_run(str(tmp_path / "torch.onnx"), {_input_name(tmp_path / "torch.onnx"): x}).values())[0]
    want = list(ort_run(str(tmp_path / "onnx.onnx"), {_input_name(tmp_path / "onnx.onnx"): x}).values())[0]
    assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()
    with torch.no_grad():
        assert np.abs(new(torch.as_tensor(x)).numpy() - want).max() < 1e-5


def _input_name(path) -> str:
    import onnx

    return onnx.load(str(path)).graph.input[0].name


def _linear_case(spec, grid=(4, 4), prefix=1, fitted=False, gamma=None, correction=False):
    rng = np.random.default_rng(0)
    tokens = prefix + grid[0] * grid[1]
    _, site = lone_site(2, 2, tokens, 8, scale=0.35, grid=grid, prefix=prefix)
    plan = L.LINEAR.applies(site, parse_pass(spec).options)
    changes = {}
    if fitted:
        changes["maps"] = LF.FeatureMaps(*(rng.standard_normal(s).astype(np.float32) * 0.5
                                           for s in ((2, 8, 5), (2, 1, 5), (2, 8, 5), (2, 1, 5))))
    if gamma is not None:
        changes["gamma"] = np.asarray(gamma, np.float32)
    if correction:
        changes["correction"] = (np.eye(8, dtype=np.float32)[None].repeat(2, 0) + 0.1 * rng.standard_normal((2, 8, 8)).astype(np.float32),
                                 rng.standard_normal((2, 1, 8)).astype(np.float32))
    plan = dataclasses.replace(plan, **changes)
    q, k, v = (rng.standard_normal((2, 2, tokens, 8)).astype(np.float32) for _ in range(3))
    return site, plan, q, k, v


@pytest.mark.parametrize("spec,fitted,gamma,correction", [
    ("linear", False, None, False),
    ("linear:phi=fitted", True, None, False),
    ("linear:phi=fitted,prefix=exact,fit=ridge", True, None, True),
    ("linear:local=2x2", False, [0.3, 0.8], False),
    ("linear:phi=fitted,local=2x2,fit=ridge", True, [0.6, 0.1], True),
])
def test_linear_module_equals_the_reference(spec, fitted, gamma, correction):
    site, plan, q, k, v = _linear_case(spec, fitted=fitted, gamma=gamma, correction=correction)
    prefix = plan.local.prefix if plan.local else (1 if plan.options["prefix"] == "exact" else 0)
    module = V.LinearAttention(plan, site.scale, 2, prefix, plan.local.allowed() if plan.local else None)
    with torch.no_grad():
        got = module(*(torch.as_tensor(x) for x in (q, k, v))).numpy()
    fq, fk = L.features_reference(q, k, scale=site.scale, phi=plan.options["phi"], maps=plan.maps)
    if plan.local is not None:
        want = H.hybrid_reference(q, k, v, scale=site.scale, allowed=plan.local.allowed(), gamma=plan.gamma, fq=fq, fk=fk)
    else:
        want = L.linear_reference(q, k, v, scale=site.scale, phi=plan.options["phi"], eps=1e-6, maps=plan.maps)
        if prefix:
            logits = site.scale * q[:, :, :prefix].astype(np.float64) @ np.swapaxes(k, -1, -2)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            want[:, :, :prefix] = (p / p.sum(-1, keepdims=True)) @ v
    if plan.correction is not None:
        r, b = plan.correction
        want[:, :, prefix:] = want[:, :, prefix:] @ r[None] + b[None]
    assert np.abs(got - want).max() < 1e-5


def test_fitted_modules_train():
    site, plan, q, k, v = _linear_case("linear:phi=fitted,local=2x2", fitted=True, gamma=[0.5, 0.5])
    module = V.LinearAttention(plan, site.scale, 2, plan.local.prefix, plan.local.allowed())
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    assert {"maps.0", "maps.1", "maps.2", "maps.3", "gamma_logit"} <= names
    module(*(torch.as_tensor(x) for x in (q, k, v))).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_rewrite_fits_on_calibration_and_reports(tmp_path):
    model = _vit("manual")
    calib = [_inputs(4, seed=s) for s in range(2)]
    new, report = art.rewrite(model, _inputs(), ["linear:phi=fitted,dim=8,steps=20,local=2x2"], calib=calib,
                              budgets=["cosine>=0.5"])
    p = report["passes"][0]
    assert p["rewritten"] == ["attn_0", "attn_1"] and report["status"] == "ok"
    for site in p["sites"]:
        assert site["plan"]["fitted with"] in ("torch", "numpy") and 0 < site["local"]["cosine"] <= 1 + 1e-6
    trainable = [n for n, prm in new.named_parameters() if "attnrewrite" in n]
    assert trainable, "fitted constants are parameters of the rewritten module"


def test_original_module_is_not_modified():
    model = _vit("fused")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = {n for n, _ in model.named_modules()}
    art.rewrite(model, _inputs(), ["window:size=4x4"])
    assert {n for n, _ in model.named_modules()} == names
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


MASKED = ["window:size=4x4", "window:size=2x2,shift=half", "neighborhood:kernel=3,dilation=2", "grid:size=2",
          "halo:block=2,halo=1"]


@pytest.mark.parametrize("spec", MASKED)
@pytest.mark.parametrize("bias_shape", [None, (2, 1, 1, 65), (2, 2, 65, 65)])
def test_flex_block_masks_equal_the_dense_mask(spec, bias_shape):
    """FlexAttention over the BlockMask of `allowed` computes what the dense masked softmax does (CPU
    forward here; its backward and compiled kernels need a GPU), biases broadcast as the ONNX site's."""
    from attnrewrite.torch.detect import detect

    gm = art.trace(_vit("fused"), _inputs())
    site = detect(gm)[0][0]
    pass_spec = parse_pass(spec)
    plan = pass_spec.applies(site)
    allowed = pass_spec.impl.allowed(site, plan)
    flex = V.MaskedAttention(allowed, site.scale, backend="flex")
    dense = V.MaskedAttention(allowed, site.scale, backend="dense")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 65, 8, generator=g) for _ in range(3))
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g)
    with torch.no_grad():
        assert flex.uses_flex(q) and not dense.uses_flex(q)
        assert (flex(q, k, v, bias) - dense(q, k, v, bias)).abs().max() < 1e-5
    assert not flex.uses_flex(q, k.clone().requires_grad_(True)), "any input that needs a gradient"
    q.requires_grad_(True)
    assert not flex.uses_flex(q), "no FlexAttention backward on the CPU: training takes the dense path"
    flex(q, k, v, bias).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_flex_modules_run_dense_when_exported(tmp_path):
    new, _ = art.rewrite(_vit("fused"), _inputs(), ["window:size=4x4"], attention="flex")
    modules = [m for m in new.modules() if isinstance(m, V.MaskedAttention)]
    assert len(modules) == 2 and all(m.backend == "flex" for m in modules)
    assert not V.MaskedAttention(np.ones((4, 4), bool), 1.0).uses_flex(torch.zeros(1, 1, 4, 2)), "auto: dense on CPU"
    x = _inputs(2, seed=5)[0]
    with torch.no_grad():
        got = new(x)
    dense, _ = art.rewrite(_vit("fused"), _inputs(), ["window:size=4x4"], attention="dense")
    with torch.no_grad():
        assert (got - dense(x)).abs().max() < 1e-5
    path = art.export(new, _inputs(), str(tmp_path / "flex.onnx"))  # FlexAttention has no ONNX form
    exported = list(ort_run(path, {_input_name(path): x.numpy()}).values())[0]
    assert np.abs(exported - got.numpy()).max() < 1e-5
    with pytest.raises(InputError, match="attention="):
        art.rewrite(_vit("fused"), _inputs(), ["window:size=4x4"], attention="fast")


def test_fallback_keeps_the_sites_the_budget_cannot_afford_original():
    """The classifier reads the CLS token, which a window pass leaves exact (prefix tokens are global):
    the last block's rewrite cannot move the logits, the first block's can. A budget no change can meet
    keeps the first original and the last rewritten; a loose one keeps both rewritten."""
    model, calib = _vit("manual", seed=3), [_inputs(4, seed=s) for s in range(2)]
    x = _inputs(4, seed=9)[0]
    with torch.no_grad():
        want = model(x)
    new, report = art.rewrite(model, _inputs(), ["window:size=2x2"], calib=calib, budgets=["cosine>=0.9999999"],
                              fallback=True)
    sites = {s["id"]: s for s in report["passes"][0]["sites"]}
    assert sites["attn_1"]["sensitivity"]["cosine"] > 0.9999999 > sites["attn_0"]["sensitivity"]["cosine"]
    assert report["passes"][0]["rewritten"] == ["attn_1"] and report["status"] == "ok", report
    assert sites["attn_0"]["status"] == "reverted" and "fallback" in sites["attn_0"]["reason"]
    with torch.no_grad():
        assert (new(x) - want).abs().max() < 1e-5
    assert sum(isinstance(m, V.MaskedAttention) for m in new.modules()) == 1
    _, report = art.rewrite(model, _inputs(), ["window:size=2x2"], calib=calib, budgets=["cosine>=0.0"], fallback=True)
    assert report["passes"][0]["rewritten"] == ["attn_0", "attn_1"]
    with pytest.raises(InputError, match="needs budgets"):
        art.rewrite(model, _inputs(), ["window:size=2x2"], fallback=True)


class MHAViT(torch.nn.Module):
    """CLIP-style blocks on nn.MultiheadAttention: with need_weights=True (the default) it traces to
    bmm over [B·heads, tokens, dim] and also averages the weights; with False, to SDPA per head."""

    def __init__(self, need_weights: bool, dim=16, heads=2, depth=2):
        super().__init__()
        torch.manual_seed(0)
        self.need_weights = need_weights
        self.patch = torch.nn.Conv2d(3, dim, 8, 8)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.pos = torch.nn.Parameter(torch.randn(1, 17, dim) * 0.5)
        self.attn = torch.nn.ModuleList(torch.nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(depth))
        self.head = torch.nn.Linear(dim, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        for attn in self.attn:
            y, _ = attn(t, t, t, need_weights=self.need_weights)
            t = t + y
        return self.head(t.mean(1))


@pytest.mark.parametrize("spec", ["window:size=2x2", "neighborhood:kernel=3", "linear", "linear:local=2x2,phi=relu"])
def test_multihead_attention_returning_weights_is_found_and_rewritten(tmp_path, spec):
    """need_weights=True folds heads into the batch; the site is found (its Q/K/V seen as one head per
    batch entry) and rewrites to what the per-head SDPA form of the same module rewrites to, except
    that what is fitted per head (the hybrid's γ) is one value shared by the folded heads."""
    x = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
    folded, per_head = MHAViT(True).eval(), MHAViT(False).eval()
    sites = art.inspect(folded, x)
    assert len(sites) == 2 and all(s.folded_heads and s.num_heads == 1 and s.grid == (4, 4) for s in sites)
    assert [s.prefix_tokens for s in sites] == [1, 1] and [s.q for s in sites][0].shape[1:] == (1, 17, 8)
    calib = [(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)),)]
    a, report = art.rewrite(folded, x, [spec], calib=calib)
    b, _ = art.rewrite(per_head, x, [spec], calib=calib)
    assert report["passes"][0]["rewritten"] == ["attn_0", "attn_1"], report
    with torch.no_grad():
        assert (a(*x) - b(*x)).abs().max() < (1e-5 if "local" not in spec else 0.05)
        assert (a(*x) - folded(*x)).abs().max() > 1e-4, "the rewrite really changed attention"
    path = art.export(a, x, str(tmp_path / "mha.onnx"))
    got = list(ort_run(path, {_input_name(path): x[0].numpy()}).values())[0]
    with torch.no_grad():
        assert np.abs(got - a(*x).numpy()).max() < 1e-5


@pytest.mark.parametrize("builder", ["hf_vit", "hf_vit_sdpa", "hf_deit", "hf_dinov2_reg", "hf_clip_vision"])
def test_transformers_models_are_found_with_their_grid_and_prefix(builder):
    """transformers' eager (matmul) and SDPA attention code, as real checkpoints run it: every layer is
    a site with the grid and prefix tokens the fixture declares, and a window rewrite applies to all."""
    from tests.fixtures import hf

    built = getattr(hf, builder)()
    sites = art.inspect(built.model, built.inputs)
    meta = built.meta.sites
    assert len(sites) == len(meta)
    for site, want in zip(sites, meta):
        assert site.grid == tuple(want.grid) and site.prefix_tokens == want.prefix_tokens
        assert site.num_heads == want.num_heads and site.head_dim == want.head_dim
    _, report = art.rewrite(built.model, built.inputs, ["window:size=4x4"])
    assert len(report["passes"][0]["rewritten"]) == len(meta), report


class EinsumAttention(torch.nn.Module):
    def __init__(self, qk="bhid,bhjd->bhij", pv="bhij,bhjd->bhid"):
        super().__init__()
        self.qk, self.pv = qk, pv

    def forward(self, q, k, v):
        return torch.einsum(self.pv, torch.einsum(self.qk, q, k).mul(0.25).softmax(-1), v)


@pytest.mark.parametrize("qk,pv,found", [("bhid,bhjd->bhij", "bhij,bhjd->bhid", True),
                                         ("b h i d, b h j d -> b h i j", "bhij,bhjc->bhic", True),
                                         ("bhid,bhjd->bhji", "bhji,bhjd->bhid", False),  # weights transposed
                                         ("bhid,bhjd->bhij", "bhij,bhid->bhjd", False)])
def test_einsum_written_attention_is_a_site(qk, pv, found):
    x = tuple(torch.randn(2, 2, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    module = EinsumAttention(qk, pv)
    sites = art.inspect(module, x)
    if not found:
        assert sites == []
        return
    assert len(sites) == 1 and sites[0].num_heads == 2 and abs(sites[0].scale - 0.25) < 1e-9
    new, _ = art.rewrite(module, x, ["window:size=3"])
    want = V.MaskedAttention(parse_pass("window:size=3").impl.allowed(sites[0], parse_pass("window:size=3").applies(sites[0])),
                             0.25)(*x)
    with torch.no_grad():
        assert (new(*x) - want).abs().max() < 1e-6


def test_a_pass_without_a_torch_module_leaves_sites_with_the_reason(monkeypatch):
    from attnrewrite.torch import api

    monkeypatch.setattr(api, "TORCH_PASSES", tuple(p for p in api.TORCH_PASSES if p != "int8"))
    _, report = art.rewrite(_vit("fused"), _inputs(), ["int8"])
    sites = report["passes"][0]["sites"]
    assert all(s["status"] == "skipped" and "no torch module yet" in s["reason"] for s in sites)


QUANT_SPECS = ["int8", "int4", "quant:pv=fp", "quant:qk=fp", "int8:granularity=head,smooth_v=true",
               "int8:granularity=block:4,p_scale=static", "int8:scales=static", "int4:scales=static,granularity=head"]


@pytest.mark.parametrize("spec", QUANT_SPECS)
def test_quant_module_equals_the_numpy_reference(spec):
    """The same integers as `quant_attention_reference`: outputs agree to float32 rounding except
    where a value sits on a rounding tie (rare; bounded by one quantisation step)."""
    from attnrewrite.passes import quantize as Qz

    _, site = lone_site(2, 2, 17, 8, scale=0.35, grid=(4, 4), prefix=1)
    pass_spec = parse_pass(spec)
    plan = pass_spec.applies(site)
    g = np.random.default_rng(3)
    q, k, v = (g.standard_normal((3, 2, 17, 8)).astype(np.float32) for _ in range(3))
    if plan.needs_fit:
        plan = pass_spec.impl.fit(site, {"q": q, "k": k, "v": v, "output": v}, plan)
    want = Qz.quant_attention_reference(q, k, v, scale=0.35, cfg=plan.config)["output"]
    module = V.QuantAttention(plan.config, 0.35)
    with torch.no_grad():
        got = module(*(torch.as_tensor(x) for x in (q, k, v))).numpy()
    diff = np.abs(got - want)
    assert np.mean(diff > 1e-5) < 0.01 and diff.max() < 0.05, (diff.max(), np.mean(diff > 1e-5))
    if plan.config.static is not None:
        assert {n for n, _ in module.named_parameters()} == {f"static.{k}" for k in plan.config.static}


@pytest.mark.parametrize("spec", ["int8", "int4:granularity=head", "paro:density=0.5,block=4,bits=8",
                                  "paro:density=0.5,block=4,bits=16"])
def test_quantised_torch_rewrites_export_equal_to_the_onnx_path(capsys, tmp_path, originals, spec):
    """Same integers in both paths (ORT's uint8 × int8 kernels vs the exported float emulation); paro's
    tables are fitted on the same calibration images on both sides."""
    from attnrewrite.cli import main

    model, calib = _vit("fused"), _inputs(4, seed=1)
    new, report = art.rewrite(model, _inputs(), [spec], calib=[calib])
    assert report["passes"][0]["rewritten"] == ["attn_0", "attn_1"], report
    art.export(new, _inputs(), str(tmp_path / "torch.onnx"))
    orig = originals("fused", 0)
    np.savez(tmp_path / "calib.npz", **{_input_name(orig): calib[0].numpy()})
    rc = main([orig, "--pass", spec, "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "onnx.onnx"), "--json"])
    capsys.readouterr()
    assert rc == 0
    x = _inputs(3, seed=2)[0].numpy()
    got = list(ort_run(str(tmp_path / "torch.onnx"), {_input_name(tmp_path / "torch.onnx"): x}).values())[0]
    want = list(ort_run(str(tmp_path / "onnx.onnx"), {_input_name(tmp_path / "onnx.onnx"): x}).values())[0]
    plain = list(ort_run(orig, {_input_name(orig): x}).values())[0]
    assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()
    assert np.abs(want - plain).max() > 1e-5 or spec.endswith("bits=16"), "the rewrite changed nothing"


def test_quant_module_trains_its_static_scales():
    _, site = lone_site(2, 2, 17, 8, scale=0.35, grid=(4, 4), prefix=1)
    spec = parse_pass("int8:scales=static")
    g = np.random.default_rng(5)
    q, k, v = (g.standard_normal((3, 2, 17, 8)).astype(np.float32) for _ in range(3))
    plan = spec.impl.fit(site, {"q": q, "k": k, "v": v, "output": v}, spec.applies(site))
    module = V.QuantAttention(plan.config, 0.35)
    x = [torch.as_tensor(a).requires_grad_(True) for a in (q, k, v)]
    module(*x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in x), "rounding passes gradients straight through"


def test_bad_inputs_are_one_sentence():
    class Untraceable(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x.softmax(-1)
            return x

    with pytest.raises(InputError, match="torch.export cannot trace"):
        art.inspect(Untraceable(), (torch.randn(2, 3),))
    with pytest.raises(InputError, match="does not match example_inputs"):
        art.rewrite(_vit(), _inputs(), ["sdpa"], calib=[(torch.randn(1, 3, 32, 32),)])


def test_cli_rewrites_a_factorys_module(capsys, tmp_path):
    import json

    from attnrewrite.cli import main

    x = _inputs(6, seed=3)[0].numpy()
    np.savez(tmp_path / "calib.npz", pixel_values=x)
    out = tmp_path / "m.onnx"
    rc = main(["torch", "tests.torch_factories:tiny_vit", "--input-shape", "pixel_values=1x3x64x64",
               "--pass", "window:size=4x4", "--calib", str(tmp_path / "calib.npz"), "-o", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(captured.out)
    assert doc["passes"][0]["rewritten"] == ["attn_0", "attn_1"] and doc["status"] == "ok"
    y = ort_run(str(out), {"pixel_values": x[:3]})
    assert list(y.values())[0].shape == (3, 10)
    rc = main(["torch", "tests.torch_factories:tiny_vit", "--input-shape", "pixel_values=1x3x64x64",
               "--pass", "window:size=4x4", "-o", str(out)])
    assert rc == 2 and "--force" in capsys.readouterr().err
    rc = main(["torch", "tests.torch_factories:tiny_vit", "--input-shape", "pixel_values=1x3x64x64",
               "--pass", "window:size=2x2", "--calib", str(tmp_path / "calib.npz"), "-o", str(out), "--force",
               "--budget", "cosine>=0.9999999", "--fallback", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    sites = json.loads(captured.out)["passes"][0]["sites"]
    assert any(s["status"] == "reverted" for s in sites) and all("sensitivity" in s for s in sites)


@pytest.mark.parametrize("factory,message", [("tests.torch_factories:missing", "cannot import"),
                                             ("tests.torch_factories:not_a_module", "not a torch.nn.Module"),
                                             ("no_such_package.mod:f", "cannot import")])
def test_cli_bad_factories_are_one_sentence(capsys, tmp_path, factory, message):
    from attnrewrite.cli import main

    rc = main(["torch", factory, "--input-shape", "x=1x3x64x64", "--pass", "sdpa", "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
