"""Side-by-side benchmarking: structure, interleaving order, thread pinning and refusals (no timing asserts)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from attnrewrite.validate import bench as B
from attnrewrite.errors import AttnRewriteError, InputError
from attnrewrite.runtime import session_options
from tests.conftest import ort_run, ort_session


def tiny(op: str, seq="seq") -> onnx.ModelProto:
    """x [batch, seq, 8] · W → `op`: two models with the same inputs and different work."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node(op, ["h"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, 8])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


@pytest.fixture()
def two_models(tmp_path):
    paths = []
    for op in ("Relu", "Sigmoid"):
        path = tmp_path / f"{op}.onnx"
        onnx.save(tiny(op), path)
        paths.append(str(path))
    return paths


FEEDS = {"x": np.ones((1, 4, 8), np.float32)}


def test_bench_models_structure_and_progress(two_models):
    calls = []
    results = B.bench_models(two_models, FEEDS, warmup=2, repeats=5, threads=1,
                             progress=lambda step, total: calls.append((step, total)))
    assert [r.path for r in results] == two_models
    assert calls == [(i, 14) for i in range(1, 15)]  # (2 warm-up + 5 repeats) × 2 models
    for r in results:
        assert r.runs == 5 and len(r.times_ms) == 5 and r.threads == 1
        assert 0 < r.min_ms <= r.p10_ms <= r.median_ms <= r.p90_ms <= max(r.times_ms)
        assert r.median_ms == pytest.approx(float(np.median(r.times_ms)))
        assert r.ratio_vs_first == pytest.approx(results[0].median_ms / r.median_ms)
    assert results[0].ratio_vs_first == 1.0


@pytest.mark.parametrize("interleave, order", [(True, "ABABAB"), (False, "AAABBB")])
def test_repeats_interleave_models(two_models, monkeypatch, interleave, order):
    seen = []
    real_run = B._run

    def recording_run(session, feeds, label):
        seen.append("A" if label == two_models[0] else "B")
        return real_run(session, feeds, label)

    monkeypatch.setattr(B, "_run", recording_run)
    B.bench_models(two_models, FEEDS, warmup=1, repeats=3, interleave=interleave)
    assert "".join(seen) == "AB" + order  # warm-up first, one run each


def test_session_options_are_pinned():
    opts = session_options(3, timing=True)
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert session_options().intra_op_num_threads >= 1


def test_bench_accepts_protos_and_drops_feeds_a_model_does_not_take():
    results = B.bench_models([tiny("Relu"), tiny("Tanh")], {**FEEDS, "unused": np.zeros(1)}, warmup=0, repeats=1)
    assert [r.path for r in results] == ["<model 0>", "<model 1>"]


def test_bench_refusals(tmp_path, two_models):
    with pytest.raises(InputError, match="does not exist"):
        B.bench_models([str(tmp_path / "nope.onnx")], FEEDS)
    with pytest.raises(InputError, match=r"needs inputs \['x'\]"):
        B.bench_models(two_models, {"z": FEEDS["x"]})
    with pytest.raises(InputError, match="repeats >= 1"):
        B.bench_models(two_models, FEEDS, repeats=0)
    with pytest.raises(InputError, match="at least one model"):
        B.bench_models([], FEEDS)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"definitely not protobuf")
    with pytest.raises(AttnRewriteError, match="cannot load"):
        B.bench_models([str(broken)], FEEDS)
    with pytest.raises(AttnRewriteError, match="failed while running"):
        B.bench_models(two_models, {"x": np.ones((1, 4, 7), np.float32)}, warmup=1, repeats=1)


def test_random_feeds_from_path_session_and_overrides(two_models):
    feeds = B.random_feeds(two_models[0], {"x": (2, 5, 8)}, seed=1)
    assert feeds["x"].shape == (2, 5, 8) and feeds["x"].dtype == np.float32
    np.testing.assert_array_equal(feeds["x"], B.random_feeds(two_models[0], {"x": (2, 5, 8)}, seed=1)["x"])
    with pytest.raises(InputError, match="--shape x="):
        B.random_feeds(two_models[0])  # seq is dynamic
    sess = ort_session(two_models[0])
    assert B.random_feeds(sess, {"x": (1, 3, 8)})["x"].shape == (1, 3, 8)
    assert B.random_feeds(tiny("Relu", seq=6))["x"].shape == (1, 6, 8)  # dynamic batch defaults to 1


def test_matmul_gflops_counts_flops_over_the_median_and_the_model_is_right(monkeypatch):
    model = B.matmul_model(3, 5, 4, batch=2)
    a = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((2, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(ort_run(model, {"A": a, "B": b})["Y"], a @ b, rtol=1e-5, atol=1e-5)
    seen = {}

    def fake_bench(models, feeds, **kwargs):  # a known median: the rate is pure arithmetic
        seen.update(shapes={n: f.shape for n, f in feeds.items()}, threads=kwargs.get("threads"))
        return [B.BenchResult(path="<model 0>", median_ms=2.0, p10_ms=2.0, p90_ms=2.0, min_ms=2.0,
                              ratio_vs_first=1.0, runs=3, threads=1)]

    monkeypatch.setattr(B, "bench_models", fake_bench)
    g = B.matmul_gflops(32, 16, 8, threads=1, batch=3, warmup=1, repeats=3)
    assert g == pytest.approx(2 * 3 * 32 * 16 * 8 / 2e-3 / 1e9)
    assert seen == {"shapes": {"A": (3, 32, 8), "B": (3, 8, 16)}, "threads": 1}
    with pytest.raises(InputError):
        B.matmul_gflops(0, 4, 4)
