"""`--report DIR` writes report.html beside report.md/json: tables, drift bars, attention maps, speed.

The attention maps are read off the emitted ONNX by feeding V = identity blocks; on a window pass they
must equal the masked-softmax reference, on linear attention the normalised φ(q)·φ(k). The page is
rendered in a real headless Chromium (Debian's `chromium`, driven by playwright): loaded images, no
console errors, a screenshot that is not blank.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from attnrewrite.passes import linear as L
from attnrewrite.passes.spatial import reference as R
from attnrewrite.registry import parse_pass
from attnrewrite.synthetic import lone_site
from attnrewrite.validate import attention_maps as A
from tests.test_cli_pipeline import run as _run

pytest.importorskip("matplotlib")


@pytest.mark.parametrize("spec", ["window:size=2x2", "linear"])
def test_effective_weights_are_the_variants_weights(spec):
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    graph, site = lone_site(1, 2, 17, 8, scale=0.35, grid=(4, 4), prefix=1)
    pass_spec = parse_pass(spec)
    plan = pass_spec.applies(site)
    q, k = (rng.standard_normal((1, 2, 17, 8)).astype(np.float32) for _ in range(2))
    got = A.effective_weights(ir.Model(graph, ir_version=10), pass_spec, site, plan, q, k, None)
    if spec == "linear":
        fq, fk = L.features_reference(q, k, scale=0.35, phi="elu1")
        raw = fq @ np.swapaxes(fk, -1, -2)
        want = (raw / (raw.sum(-1, keepdims=True) + 1e-6))[0]
    else:
        allowed = R.allowed_window((4, 4), 1, (2, 2))
        logits = np.where(allowed, 0.35 * q[0].astype(np.float64) @ np.swapaxes(k[0], -1, -2), -np.inf)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        want = e / e.sum(-1, keepdims=True)
    assert np.abs(got - want).max() < 1e-6


def test_report_dir_holds_a_self_contained_page(capsys, tmp_path, vit32):
    model, calib = vit32
    rc, out, err = _run(capsys, model, "--pass", "window:size=2x2", "--calib", calib, "-o", tmp_path / "w.onnx",
                        "--sensitivity", "--report", tmp_path / "rep", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert [r["path"] for r in doc["speed"]["results"]] == [str(model), str(tmp_path / "w.onnx")]
    page = (tmp_path / "rep" / "report.html").read_text()
    assert {"report.json", "report.md", "report.html"} <= {p.name for p in (tmp_path / "rep").iterdir()}
    images = re.findall(r"<img[^>]*src='([^']*)'", page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"(src|href)=['\"]https?:", page)  # nothing fetched from outside
    assert "alone: model cos" in page and "per-site drift" in page and "speed:" in page
    assert page.count("<h2>attention maps, attn_") == 2  # both sites of the 2-layer ViT


def test_audit_report_has_the_same_page(capsys, tmp_path, vit32):
    model, calib = vit32
    rc, _, err = _run(capsys, model, "--pass", "neighborhood:kernel=3", "--calib", calib, "-o", tmp_path / "n.onnx")
    assert rc == 0, err
    rc, _, err = _run(capsys, "audit", model, tmp_path / "n.onnx", "--calib", calib, "--budget", "cosine>=0.1",
                      "--report", tmp_path / "a")
    assert rc == 0, err
    page = (tmp_path / "a" / "report.html").read_text()
    assert "per-site drift (AFTER vs BEFORE)" in page and "speed:" in page and "data:image/png;base64," in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_page_renders_in_headless_chromium(capsys, tmp_path, vit32):
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright drives the browser (pip install playwright)")
    model, calib = vit32
    rc, _, err = _run(capsys, model, "--pass", "linear:local=2x2", "--calib", calib, "-o", tmp_path / "h.onnx",
                      "--report", tmp_path / "rep")
    assert rc == 0, err
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((tmp_path / "rep" / "report.html").as_uri())
        loaded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        shot = page.screenshot(full_page=True)
        browser.close()
    assert not errors, errors
    assert loaded and all(loaded), loaded
    from io import BytesIO

    import matplotlib.image as mpimg

    pixels = mpimg.imread(BytesIO(shot), format="png")
    assert pixels.shape[0] > 900 and pixels[..., :3].std() > 0.05  # a long page, not a blank one
