"""Models saved by onnxruntime's graph optimiser (`optimized_model_filepath`), as deployment pipelines ship them.

ORT fuses `q @ kᵀ * scale` into `com.microsoft.FusedMatMul` (MatMulScaleFusion); canonicalisation expands
it back so the sites are found, and the rewritten model must load and run under ORT's own optimiser again.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from attnrewrite.onnx.canonicalize import canonicalize
from attnrewrite.onnx.modelio import load_model
from attnrewrite.onnx.ort_fusions import expand_fused_matmuls
from tests.conftest import ort_run
from tests.test_cli_pipeline import run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")


def _distilbert(tmp_path, level: str, dynamic: bool):
    cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                        max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DistilBertModel(cfg).eval()
    raw, optimised = tmp_path / "distilbert.onnx", tmp_path / f"distilbert.{level}.onnx"
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randint(0, 100, (1, 16)), torch.ones(1, 16, dtype=torch.long)), str(raw),
                          dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], dynamic_axes=axes)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
    options.optimized_model_filepath = str(optimised)
    options.log_severity_level = 3
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    return raw, optimised


@pytest.mark.parametrize("level,dynamic", [("extended", True), ("extended", False), ("all", False)])
def test_ort_optimised_distilbert_is_found_and_rewritten(capsys, tmp_path, level, dynamic):
    raw, path = _distilbert(tmp_path, level, dynamic)
    assert "FusedMatMul" in {n.op_type for n in onnx.load(path).graph.node}
    rc, out, err = run(capsys, "inspect", path, "--json")
    assert rc == 0, err
    assert len(json.loads(out)["sites"]) == 2
    target = tmp_path / "na.onnx"
    shape = ("--shape", "input_ids=1x16", "--shape", "attention_mask=1x16") if dynamic else ()
    rc, out, err = run(capsys, path, "--pass", "neighborhood:kernel=5", "-o", target, "--json", *shape)
    assert rc == 0, err
    assert json.loads(out)["passes"][0]["rewritten"] == ["attn_0", "attn_1"]
    feeds = {"input_ids": np.arange(16, dtype=np.int64)[None] % 100, "attention_mask": np.ones((1, 16), np.int64)}
    feeds["attention_mask"][0, 12:] = 0
    got = ort_run(target, feeds)["last_hidden_state"]  # loads under ORT's default (full) optimisation
    assert np.isfinite(got).all() and got.shape == (1, 16, 32)


def test_expansion_is_exact(tmp_path):
    """The expanded Transpose → MatMul → Mul computes what FusedMatMul did."""
    _, path = _distilbert(tmp_path, "extended", False)
    before = ort_run(path, {"input_ids": np.arange(16, dtype=np.int64)[None] % 100,
                            "attention_mask": np.ones((1, 16), np.int64)})["last_hidden_state"]
    model = load_model(path)
    assert expand_fused_matmuls(model.graph) == 2
    canonicalize(model)
    after = ort_run(ir.to_proto(model), {"input_ids": np.arange(16, dtype=np.int64)[None] % 100,
                                        "attention_mask": np.ones((1, 16), np.int64)})["last_hidden_state"]
    np.testing.assert_allclose(after, before, atol=1e-5)
