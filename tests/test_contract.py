"""The pass contract (rewriter/registry.py): listing and parsing, third-party entry points, `ensures`,
`fit`, deterministic provenance, and the promises of individual built-in passes that the contract
lets them make (`sdpa:fuse=onnx`, the `block` alias, linear's key weights).

Every model here is written with onnx.helper; passes defined in this file are registered in-process
with `attnrewrite.registry.register` (the registry is restored after each test).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_ir import tape as ir_tape

from attnrewrite import registry
from attnrewrite.cli import main
from attnrewrite.errors import PostconditionError
from attnrewrite.onnx.analysis import analyze
from attnrewrite.onnx.modelio import load_model
from attnrewrite.onnx.verify import reference_attention
from attnrewrite.passes.linear import key_weight_reference, linear_reference
from attnrewrite.passes.ops import softmax_attention
from attnrewrite.registry import BasePass, Plan, SiteDrift, parse_pass
from attnrewrite.validate.pipeline import PASS_TAG, Pipeline
from tests import onnx_builders as B
from tests.conftest import ort_run

REPO = Path(__file__).resolve().parents[1]


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_subprocess(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnrewrite", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def save(tmp_path: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, path)
    return path


def qkv_feeds(seed=0, n=6, heads=2, d=4, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal((1, heads, n, d)) * 2).astype(dtype) for name in "qkv"}


@pytest.fixture
def register(monkeypatch):
    """`register(impl)` for this test only: the registry is a copy that monkeypatch puts back."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.available()))
    return registry.register


# --- listing and parsing ------------------------------------------------------------------------


def test_passes_json_lists_every_pass_and_every_default_parses_back():
    """`passes --json` prints defaults in the syntax `--pass` takes: each one must parse to the default
    itself (this caught `size=(7, 7)` and `keep_global=0`)."""
    proc = cli_subprocess("passes", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {p["name"]: p for p in json.loads(proc.stdout)["passes"]}
    entry_points = {e.name for e in metadata.entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert set(listed) == entry_points
    assert {"sdpa", "linear", "window", "block", "grid", "halo", "neighborhood"} <= entry_points
    passes = registry.available()
    for name, listing in listed.items():
        impl = passes[name]
        assert listing["exact"] is impl.exact and listing["description"] == impl.description, name
        assert [p["name"] for p in listing["params"]] == [p.name for p in impl.params], name
        defaults = {p.name: p.default for p in impl.params}
        for param, declared in zip(listing["params"], impl.params):
            assert param["choices"] == (list(declared.choices) if declared.choices else None), (name, param)
            if param["choices"] is not None:
                assert param["default"] in param["choices"], (name, param)
            text = f"{name}:{param['name']}={param['default']}"
            spec = parse_pass(text)
            parsed = spec.options[param["name"]]
            assert parsed == defaults[param["name"]] and type(parsed) is type(defaults[param["name"]]), (
                f"{text} parses to {parsed!r}, the default is {defaults[param['name']]!r}")
            assert spec.label() == name, f"{text} is labelled {spec.label()!r}: a default counted as a change"
        everything = ",".join(f"{p['name']}={p['default']}" for p in listing["params"])
        assert parse_pass(f"{name}:{everything}" if everything else name).options == defaults, name


# --- a third-party pass, installed through its dist-info --------------------------------------


THIRD_PARTY = '''
from onnx_ir import tape as ir_tape

from attnrewrite.passes.ops import softmax_attention
from attnrewrite.registry import BasePass, Plan


class MyExact(BasePass):
    name = "myexact"
    exact = True
    description = "plain softmax attention, shipped by another package"

    def applies(self, site, options):
        return Plan(options)

    def rewrite(self, graph, site, plan):
        return softmax_attention(ir_tape.Tape(graph), site.q, site.k, site.v, site.scale, site.bias)
'''


def test_third_party_pass_from_an_entry_point(tmp_path):
    plugin = tmp_path / "plugin"
    info = plugin / "thirdparty_pass-0.1.dist-info"
    info.mkdir(parents=True)
    (plugin / "thirdparty_pass.py").write_text(THIRD_PARTY)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty_pass\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[attnrewrite.passes]\nmyexact = thirdparty_pass:MyExact\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(plugin), os.environ.get("PYTHONPATH")]))}

    proc = cli_subprocess("passes", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    listed = {p["name"]: p for p in json.loads(proc.stdout)["passes"]}
    assert listed["myexact"] == {"name": "myexact", "exact": True, "params": [],
                                 "description": "plain softmax attention, shipped by another package"}
    assert "sdpa" in listed  # the built-in ones are still there

    src = save(tmp_path, B.plain_attention("input", project=True))
    out = tmp_path / "out.onnx"
    proc = cli_subprocess(src, "--pass", "myexact", "-o", out, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    (report,) = json.loads(proc.stdout)["passes"]
    assert report["pass"] == "myexact" and report["exact"] is True and report["rewritten"] == ["attn_0"]
    assert report["metrics_vs_original"]["y"]["max_abs"] <= 1e-5, report["metrics_vs_original"]
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert any(p.key == PASS_TAG and p.value == "myexact" for n in model.graph.node for p in n.metadata_props)
    feeds = {**qkv_feeds(), "mask": np.where(np.arange(6) < 4, 0, -1e4).astype(np.float32).reshape(1, 1, 1, 6)}
    got, want = ort_run(out, feeds)["y"], ort_run(src, feeds)["y"]
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()


# --- ensures -----------------------------------------------------------------------------------


class DoubledScale(BasePass):
    """Claims to be exact but doubles the scale; its `ensures` catches it."""

    name = "doubled"
    exact = True
    description = "test pass: wrong on purpose"

    def applies(self, site, options):
        return Plan(options)

    def rewrite(self, graph, site, plan):
        return softmax_attention(ir_tape.Tape(graph), site.q, site.k, site.v, 2 * site.scale, site.bias)

    def ensures(self, drift: SiteDrift) -> None:
        rel = drift.metrics["rel_l2"]
        if rel > 1e-5:
            raise PostconditionError(f"doubled promised an exact rewrite, but {drift.site.id} moved by rel_l2 {rel:.1e}")


class DoubledScaleNoPromise(DoubledScale):
    name = "doubled_unchecked"

    def ensures(self, drift: SiteDrift) -> None:
        return None


def test_broken_postcondition_is_exit_3_in_one_sentence(capsys, tmp_path, register):
    register(DoubledScale())
    register(DoubledScaleNoPromise())
    src = save(tmp_path, B.plain_attention("const", project=True))
    out = tmp_path / "out.onnx"
    rc, stdout, err = cli(capsys, src, "--pass", "doubled", "-o", out)
    assert rc == 3, err
    assert "doubled promised an exact rewrite, but attn_0 moved by rel_l2" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists(), "a pass that broke its promise must not leave a model behind"
    # the same wrong rewrite without the promise goes through: the exit came from `ensures`
    rc, stdout, err = cli(capsys, src, "--pass", "doubled_unchecked", "-o", out, "--json")
    assert rc == 0, err
    assert json.loads(stdout)["passes"][0]["sites"][0]["local"]["rel_l2"] > 1e-3


def test_sdpa_ensures_holds_it_to_float_rounding(tmp_path):
    site = analyze(save(tmp_path, B.plain_attention("const", project=True))).sites[0]
    sdpa = registry.available()["sdpa"]
    plan = sdpa.applies(site, {"fuse": "none"})
    assert isinstance(plan, Plan)
    with pytest.raises(PostconditionError, match=r"attn_0.*1\.00e-03"):
        sdpa.ensures(SiteDrift(site=site, plan=plan, metrics={"rel_l2": 1e-3, "cosine": 1.0, "max_abs": 1e-3}))
    sdpa.ensures(SiteDrift(site=site, plan=plan, metrics={"rel_l2": 1e-7, "cosine": 1.0, "max_abs": 1e-7}))


# --- fit ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FittedPlan(Plan):
    fitted_scale: float | None = None
    fit_error: float | None = None


class FitProbe(BasePass):
    """Fits the logit scale back from the activations; rewrite refuses a plan that was not fitted."""

    name = "fitprobe"
    exact = True
    description = "test pass: fit then rewrite"

    def __init__(self):
        self.fitted: list[tuple[dict, FittedPlan]] = []
        self.rewritten: list[FittedPlan] = []

    def applies(self, site, options):
        return FittedPlan(options, needs_fit=True)

    def fit(self, site, activations, plan):
        acts = {name: np.asarray(a) for name, a in activations.items()}
        # the activations must be this site's: its own scale reproduces its output from its Q/K/V
        error = float(np.abs(reference_attention(acts["q"], acts["k"], acts["v"], site.scale) - acts["output"]).max())
        fitted = dataclasses.replace(plan, fitted_scale=site.scale, fit_error=error)
        self.fitted.append(({n: a.shape for n, a in acts.items()}, fitted))
        return fitted

    def rewrite(self, graph, site, plan):
        if plan.fitted_scale is None:
            raise AssertionError("rewrite got a plan that fit did not return")
        self.rewritten.append(plan)
        return softmax_attention(ir_tape.Tape(graph), site.q, site.k, site.v, plan.fitted_scale, site.bias)


def test_fit_receives_bhnd_activations_and_rewrite_receives_its_plan(tmp_path, register):
    probe = register(FitProbe())
    path = save(tmp_path, B.plain_attention("none", project=True, n=6, heads=2, d=4))
    batches = [qkv_feeds(seed) for seed in range(3)]
    pipeline = Pipeline(path=path, batches=batches, fit_batches=2)
    (report,) = pipeline.run(load_model(path), [parse_pass("fitprobe")])
    ((shapes, fitted),) = probe.fitted
    assert shapes == {"q": (2, 2, 6, 4), "k": (2, 2, 6, 4), "v": (2, 2, 6, 4), "output": (2, 2, 6, 4)}
    assert fitted.fit_error <= 1e-5, f"activations are not this site's Q/K/V/output: error {fitted.fit_error:.2e}"
    assert probe.rewritten == [fitted] and probe.rewritten[0] is fitted
    (site,) = report.sites
    assert site.status == "rewritten" and site.local["max_abs"] <= 1e-6, site


# --- provenance: deterministic names -----------------------------------------------------------


def test_rewritten_model_bytes_do_not_depend_on_the_process(tmp_path):
    src = save(tmp_path, B.tiny_vit(depth=2))
    outs = [tmp_path / f"out{seed}.onnx" for seed in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "attnrewrite", str(src), "--pass", "sdpa",
                               "--pass", "window:size=2x2,shift=half", "-o", str(out), "--samples", "2"],
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed, out in zip((0, 1), outs)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_nodes_added_by_a_pass_are_named_from_site_pass_and_counter(capsys, tmp_path):
    src = save(tmp_path, B.plain_attention("input", project=True))
    out = tmp_path / "out.onnx"
    rc, stdout, err = cli(capsys, src, "--pass", "linear:phi=relu", "-o", out)
    assert rc == 0, err
    nodes = onnx.load(out).graph.node
    added = [n.name for n in nodes if any(p.key == PASS_TAG for p in n.metadata_props)]
    assert added, "no node carries the pass label"
    prefix = "attnrewrite/attn_0/linear[phi=relu]/"
    wrong = [name for name in added if not name.startswith(prefix)]
    assert not wrong, f"{len(wrong)} of {len(added)} added nodes are not named {prefix}…: {wrong[:5]}"
    assert len(set(added)) == len(added)


# --- sdpa:fuse=onnx ------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", ["none", "input"])
def test_sdpa_fuse_onnx_emits_attention_and_matches(capsys, tmp_path, bias):
    src = save(tmp_path, B.plain_attention(bias, project=True, opset=23))
    out = tmp_path / "out.onnx"
    rc, stdout, err = cli(capsys, src, "--pass", "sdpa:fuse=onnx", "-o", out, "--json")
    assert rc == 0, err
    assert json.loads(stdout)["passes"][0]["rewritten"] == ["attn_0"]
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ("", "Attention") in ops and ("", "Softmax") not in ops, ops
    feeds = qkv_feeds(seed=3)
    if bias == "input":
        feeds["mask"] = np.where(np.arange(6) < 4, 0, -1e4).astype(np.float32).reshape(1, 1, 1, 6)
    got, want = ort_run(out, feeds)["y"], ort_run(src, feeds)["y"]
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()


def test_sdpa_fuse_onnx_is_skipped_before_opset_23(capsys, tmp_path):
    src = save(tmp_path, B.plain_attention("none", project=True, opset=17))
    rc, stdout, err = cli(capsys, src, "--pass", "sdpa:fuse=onnx", "-o", tmp_path / "out.onnx", "--json")
    assert rc == 0, err
    (site,) = json.loads(stdout)["passes"][0]["sites"]
    assert site["status"] == "skipped" and "needs opset >= 23" in site["reason"], site


# --- the block alias -----------------------------------------------------------------------------


def test_block_is_window_under_another_name(capsys, tmp_path):
    src = save(tmp_path, B.tiny_vit(depth=2))
    texts, outputs = {}, {}
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for name in ("window", "block"):
        out = tmp_path / f"{name}.onnx"
        rc, stdout, err = cli(capsys, src, "--pass", f"{name}:size=2x2,shift=half", "-o", out, "--json")
        assert rc == 0, err
        assert json.loads(stdout)["passes"][0]["rewritten"] == ["attn_0", "attn_1"]
        texts[name] = str(onnx.load(out)).replace("block", "window")  # the pass name is the only difference
        outputs[name] = ort_run(out, {"x": x})["logits"]
    assert texts["block"] == texts["window"]
    assert np.abs(outputs["block"] - outputs["window"]).max() == 0.0


# --- linear's masked path against its numpy reference ------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 5e-3)])
@pytest.mark.parametrize("fill", [-np.inf, -1e4])
def test_linear_with_key_padding_mask_matches_reference(capsys, tmp_path, dtype, tol, fill):
    """Softmax weights key j by exp(b_j); linear must weight φ(k_j) the same way (0 for masked keys)."""
    n = 8
    src = save(tmp_path, B.plain_attention("input", n=n, project=True, dtype=dtype))
    out = tmp_path / "out.onnx"
    rc, stdout, err = cli(capsys, src, "--pass", "linear", "-o", out, "--json")
    assert rc == 0, err
    assert json.loads(stdout)["passes"][0]["rewritten"] == ["attn_0"]
    model = onnx.load(out)
    site_output = next(node for node in model.graph.node if list(node.output) == ["y"]).input[0]
    feeds = qkv_feeds(seed=1, n=n, dtype=dtype)
    feeds["mask"] = np.where(np.arange(n) < 5, 0, fill).astype(dtype).reshape(1, 1, 1, n)
    got = ort_run(model, feeds, outputs=[site_output])[site_output]
    assert got.dtype == dtype
    want = linear_reference(feeds["q"], feeds["k"], feeds["v"], scale=0.5, phi="elu1", eps=1e-6,
                            key_weight=key_weight_reference(feeds["mask"]))
    unmasked = linear_reference(feeds["q"], feeds["k"], feeds["v"], scale=0.5, phi="elu1", eps=1e-6)
    assert np.abs(want - unmasked).max() > 10 * tol * np.abs(want).max()  # the mask matters at this tolerance
    err = float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())
    assert err <= tol, f"{np.dtype(dtype).name}: max relative error {err:.2e} > {tol}"
