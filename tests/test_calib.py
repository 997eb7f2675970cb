"""Calibration inputs: shapes, seeded random data that means something, and every refusal path."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from attnrewrite.validate import calib as C
from attnrewrite.errors import InputError
from tests.conftest import ort_run, ort_session

VOCAB = 50


def _model(nodes, inputs, outputs, inits=(), check=True):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    if check:
        onnx.checker.check_model(model)
    return model


def text_model():
    """input_ids (via Cast) index a [VOCAB, 4] embedding; the mask and token types are added in."""
    emb = numpy_helper.from_array(np.random.default_rng(0).standard_normal((VOCAB, 4)).astype(np.float32), "emb")
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["emb", "ids32"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "ax"], ["m3"]),
        helper.make_node("Cast", ["token_type_ids"], ["tf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["tf", "ax"], ["t3"]),
        helper.make_node("Mul", ["e", "m3"], ["em"]),
        helper.make_node("Add", ["em", "t3"], ["y"]),
    ]
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
            for n in ("input_ids", "attention_mask", "token_type_ids")]
    ax = numpy_helper.from_array(np.array([-1], np.int64), "ax")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    return _model(nodes, ints, [y], [emb, ax])


def vision_model(batch="N", hw=8):
    """pixel_values [batch, 3, hw, hw] → per-image channel means; W is listed as an input too (old exporters)."""
    w = numpy_helper.from_array(np.ones((1,), np.float32), "W")
    nodes = [helper.make_node("Mul", ["pixel_values", "W"], ["p"]), helper.make_node("GlobalAveragePool", ["p"], ["y"])]
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [batch, 3, hw, hw]),
              helper.make_tensor_value_info("W", TensorProto.FLOAT, [1])]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, 1, 1])], [w])


def one_sentence(exc: BaseException) -> str:
    msg = str(exc.value if hasattr(exc, "value") else exc)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


# --------------------------------------------------------------------------- specs and shapes


def test_input_specs_skip_initializers_and_find_the_embedding_table(tmp_path):
    path = tmp_path / "v.onnx"
    onnx.save(vision_model(), path)
    (spec,) = C.input_specs(path)
    assert (spec.name, spec.dtype, spec.shape) == ("pixel_values", np.dtype(np.float32), ("N", 3, 8, 8))
    specs = {s.name: s for s in C.input_specs(text_model())}
    assert specs["input_ids"].index_limit == VOCAB  # found through the Cast
    assert specs["attention_mask"].index_limit is None
    assert specs["input_ids"].shape == ("batch", "seq")


def test_input_specs_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError) as e:
        C.input_specs(tmp_path / "nope.onnx")
    one_sentence(e)


def test_parse_shape_overrides():
    assert C.parse_shape_overrides(["pixel_values=2x3x224x224", " ids = 1X7 "]) == {
        "pixel_values": (2, 3, 224, 224), "ids": (1, 7)}
    assert C.parse_shape_overrides([]) == {}


@pytest.mark.parametrize("text", ["pixel_values", "pixel_values=", "=1x2", "x=1,2", "x=1x", "x=axb", "x=-1x2", "x=1x0"])
def test_parse_shape_overrides_rejects_bad_syntax(text):
    with pytest.raises(InputError) as e:
        C.parse_shape_overrides([text])
    one_sentence(e)


def test_parse_shape_overrides_rejects_conflicting_duplicates():
    with pytest.raises(InputError, match="twice"):
        C.parse_shape_overrides(["x=1x2", "x=1x3"])


def test_resolve_shapes_batch_defaults_to_one_other_dynamic_dims_need_shape():
    assert C.resolve_shapes(C.input_specs(vision_model()), {}) == {"pixel_values": (1, 3, 8, 8)}
    specs = C.input_specs(text_model())
    with pytest.raises(InputError) as e:
        C.resolve_shapes(specs, {})
    msg = one_sentence(e)
    assert "'input_ids'" in msg and "--shape input_ids=" in msg and "dim 1" in msg
    shapes = C.resolve_shapes(specs, {"input_ids": (2, 5), "attention_mask": (2, 5), "token_type_ids": (2, 5)})
    assert shapes["attention_mask"] == (2, 5)


@pytest.mark.parametrize("overrides, needle", [
    ({"pixel_values": (1, 3, 8)}, "rank 3"),
    ({"pixel_values": (1, 4, 8, 8)}, "dim 1 is fixed at 3"),
    ({"pixels": (1, 3, 8, 8)}, "unknown inputs ['pixels']"),
])
def test_resolve_shapes_rejects_bad_overrides(overrides, needle):
    with pytest.raises(InputError) as e:
        C.resolve_shapes(C.input_specs(vision_model()), overrides)
    assert needle in one_sentence(e)


def test_input_without_any_shape_needs_an_override():
    model = _model([helper.make_node("Identity", ["x"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], check=False)
    specs = C.input_specs(model)
    assert not specs[0].rank_known
    with pytest.raises(InputError, match="--shape x="):
        C.resolve_shapes(specs, {})
    assert C.resolve_shapes(specs, {"x": (2, 3)}) == {"x": (2, 3)}


# --------------------------------------------------------------------------- random inputs


TEXT_SHAPES = {"input_ids": (1, 16), "attention_mask": (1, 16), "token_type_ids": (1, 16)}


def test_random_inputs_are_deterministic_by_seed():
    specs = C.input_specs(text_model())
    a = C.load_calibration(None, specs, TEXT_SHAPES, num_samples=4, seed=3)
    b = C.load_calibration(None, specs, TEXT_SHAPES, num_samples=4, seed=3)
    c = C.load_calibration(None, specs, TEXT_SHAPES, num_samples=4, seed=4)
    for x, y in zip(a.batches, b.batches):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a.batches, c.batches))
    assert a.source == "random(seed=3, n=4)" and a.num_samples == 4


def test_random_text_inputs_make_sense_and_run():
    model = text_model()
    specs = C.input_specs(model)
    cal = C.load_calibration(None, specs, TEXT_SHAPES, num_samples=8, seed=0)
    assert len(cal.batches) == 8  # batch 1 from the override → 8 feeds
    ids = np.concatenate([b["input_ids"] for b in cal.batches])
    masks = np.concatenate([b["attention_mask"] for b in cal.batches])
    types = np.concatenate([b["token_type_ids"] for b in cal.batches])
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < VOCAB  # embedding table size from the graph
    assert len(np.unique(ids)) > 10
    assert set(np.unique(masks)) == {0, 1} and masks.dtype == np.int64
    assert (masks[:, 0] == 1).all(), "the first token must always be kept"
    assert (np.diff(masks, axis=1) <= 0).all(), "padding must be a suffix"
    padded = (masks == 0).any(axis=1)
    assert 0 < padded.sum() < len(masks), f"some but not all rows padded, got {padded}"
    assert not types.any()
    emb = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "emb"))
    sess = ort_session(model)
    for feeds in cal.batches:  # the model runs on them and computes what it should
        want = emb[feeds["input_ids"]] * feeds["attention_mask"][..., None] + feeds["token_type_ids"][..., None]
        np.testing.assert_allclose(ort_run(sess, feeds)["y"], want, rtol=1e-6)


def test_random_ids_without_table_use_vocab_size_or_default():
    model = _model([helper.make_node("Cast", ["input_ids"], ["y"], to=TensorProto.FLOAT)],
                   [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [4, 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])])
    specs = C.input_specs(model)
    assert specs[0].index_limit is None
    ids = C.load_calibration(None, specs, num_samples=4).batches[0]["input_ids"]
    assert ids.max() < C.DEFAULT_VOCAB and ids.max() > 100
    small = C.load_calibration(None, specs, num_samples=4, vocab_size=7).batches[0]["input_ids"]
    assert small.min() >= 0 and small.max() < 7


def test_random_samples_round_up_to_whole_batches():
    specs = C.input_specs(vision_model())
    cal = C.load_calibration(None, specs, {"pixel_values": (3, 3, 8, 8)}, num_samples=8, seed=1)
    assert [b["pixel_values"].shape for b in cal.batches] == [(3, 3, 8, 8)] * 3
    assert cal.num_samples == 9
    x = np.concatenate([b["pixel_values"] for b in cal.batches])
    assert x.dtype == np.float32 and abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2


def test_random_mask_pads_within_a_batch_too():
    spec = C.InputSpec("attention_mask", np.dtype(np.bool_), ("b", "s"))
    mask = C.random_input(spec, (4, 10), np.random.default_rng(0))
    assert mask.dtype == np.bool_ and mask[:, 0].all()
    assert mask[0].all() and not mask[1].all() and mask[2].all() and not mask[3].all()


def test_zero_samples_refused():
    with pytest.raises(InputError):
        C.load_calibration(None, C.input_specs(vision_model()), num_samples=0)


# --------------------------------------------------------------------------- npz files


def _vision_specs():
    return C.input_specs(vision_model())


def test_npz_round_trip_batches_and_float64_cast(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 3, 8, 8))
    path = tmp_path / "cal.npz"
    np.savez(path, pixel_values=x)
    cal = C.load_calibration(path, _vision_specs(), batch_size=4)
    assert [b["pixel_values"].shape[0] for b in cal.batches] == [4, 4, 2]
    assert cal.batches[0]["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(np.concatenate([b["pixel_values"] for b in cal.batches]), x, rtol=1e-6)
    assert cal.num_samples == 10 and cal.source.startswith(f"npz:{path} sha256=")


def test_npz_batch_follows_a_static_batch_dim(tmp_path):
    path = tmp_path / "cal.npz"
    np.savez(path, pixel_values=np.zeros((4, 3, 8, 8), np.float32))
    cal = C.load_calibration(path, C.input_specs(vision_model(batch=2)))
    assert [b["pixel_values"].shape[0] for b in cal.batches] == [2, 2]
    np.savez(path, pixel_values=np.zeros((3, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="multiple of 2"):
        C.load_calibration(path, C.input_specs(vision_model(batch=2)))


def _expect_error(tmp_path, needle, specs=None, **arrays):
    path = tmp_path / "cal.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError) as e:
        C.load_calibration(path, specs or _vision_specs())
    msg = one_sentence(e)
    assert needle in msg, msg
    return msg


def test_npz_wrong_keys_lists_missing_and_unexpected(tmp_path):
    msg = _expect_error(tmp_path, "missing ['pixel_values']", pixels=np.zeros((1, 3, 8, 8), np.float32))
    assert "unexpected ['pixels']" in msg


def test_npz_wrong_shape(tmp_path):
    _expect_error(tmp_path, "dim 2 must be 8", pixel_values=np.zeros((2, 3, 9, 8), np.float32))
    _expect_error(tmp_path, "rank 4", pixel_values=np.zeros((3, 8, 8), np.float32))


def test_npz_wrong_dtype(tmp_path):
    specs = C.input_specs(text_model())
    ids = np.zeros((2, 5), np.float32)
    _expect_error(tmp_path, "wants int64", specs, input_ids=ids, attention_mask=ids, token_type_ids=ids)
    _expect_error(tmp_path, "wants float32", pixel_values=np.zeros((1, 3, 8, 8), np.int64))
    _expect_error(tmp_path, "not numeric", pixel_values=np.full((1, 3, 8, 8), "a"))


def test_npz_int32_ids_are_cast_but_must_fit_the_table(tmp_path):
    specs = C.input_specs(text_model())
    ids = np.arange(10, dtype=np.int32).reshape(2, 5)
    path = tmp_path / "ok.npz"
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    cal = C.load_calibration(path, specs)
    assert cal.batches[0]["input_ids"].dtype == np.int64
    _expect_error(tmp_path, "table of 50 rows", specs, input_ids=ids + 45, attention_mask=np.ones_like(ids),
                  token_type_ids=np.zeros_like(ids))


def test_npz_sample_counts_must_agree(tmp_path):
    specs = C.input_specs(text_model())
    a, b = np.zeros((2, 5), np.int64), np.zeros((3, 5), np.int64)
    _expect_error(tmp_path, "disagree", specs, input_ids=a, attention_mask=b, token_type_ids=a)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_nan_or_inf_refused(tmp_path, bad):
    x = np.zeros((2, 3, 8, 8), np.float32)
    x[1, 2, 3, 4] = bad
    _expect_error(tmp_path, "NaN or infinite", pixel_values=x)


def test_npz_float64_overflowing_float32_refused(tmp_path):
    _expect_error(tmp_path, "too large", pixel_values=np.full((1, 3, 8, 8), 1e300))


def test_pickled_npz_refused(tmp_path):
    obj = np.empty((1,), dtype=object)
    obj[0] = {"evil": 1}
    msg = _expect_error(tmp_path, "pickled", pixel_values=obj)
    assert "refused" in msg


@pytest.mark.parametrize("content, name", [(b"not a zip", "cal.npz"), (b"x", "cal.txt")])
def test_unreadable_or_unknown_files_refused(tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        C.load_calibration(path, _vision_specs())
    one_sentence(e)


def test_single_npy_renamed_npz_refused(tmp_path):
    path = tmp_path / "cal.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="single array"):
        C.load_calibration(path, _vision_specs())


def test_missing_source_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        C.load_calibration(tmp_path / "nope.npz", _vision_specs())


# --------------------------------------------------------------------------- folders


def test_npy_folder_orders_numbered_files_and_stacks_single_samples(tmp_path):
    for k in (10, 2, 1):
        np.save(tmp_path / f"pixel_values_{k}.npy", np.full((3, 8, 8), k, np.float32))  # one sample each
    cal = C.load_calibration(tmp_path, _vision_specs())
    x = np.concatenate([b["pixel_values"] for b in cal.batches])
    assert x[:, 0, 0, 0].tolist() == [1.0, 2.0, 10.0]
    assert cal.source.startswith(f"npy:{tmp_path} files=3 sha256=")


def test_npy_folder_errors(tmp_path):
    np.save(tmp_path / "pixels_0.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(InputError, match="does not name a model input"):
        C.load_calibration(tmp_path, _vision_specs())
    (tmp_path / "pixels_0.npy").unlink()
    np.save(tmp_path / "pixel_values_0.npy", np.zeros((3, 8, 8), np.float32))
    np.save(tmp_path / "pixel_values_1.npy", np.zeros((3, 4, 8), np.float32))
    with pytest.raises(InputError) as e:
        C.load_calibration(tmp_path, _vision_specs())
    assert "disagree on shape" in one_sentence(e)
    (tmp_path / "pixel_values_1.npy").unlink()
    obj = np.empty((1,), dtype=object)
    np.save(tmp_path / "pixel_values_1.npy", obj, allow_pickle=True)
    with pytest.raises(InputError, match="pickled"):
        C.load_calibration(tmp_path, _vision_specs())


def test_empty_folder_refused(tmp_path):
    with pytest.raises(InputError, match="no .npy or image"):
        C.load_calibration(tmp_path, _vision_specs())


def test_image_folder_is_resized_scaled_and_normalised(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (20, 12), (255, 0, 128)).save(tmp_path / "a.png")
    Image.new("RGB", (5, 5), (0, 0, 0)).save(tmp_path / "b.jpg")
    cal = C.load_calibration(tmp_path, _vision_specs())
    x = np.concatenate([b["pixel_values"] for b in cal.batches])
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want_a = (np.array([255, 0, 128]) / 255.0 - mean) / std
    np.testing.assert_allclose(x[0].mean(axis=(1, 2)), want_a, atol=1e-5)
    np.testing.assert_allclose(x[1].mean(axis=(1, 2)), -mean / std, atol=2e-2)  # jpeg may round a little
    assert cal.source.startswith(f"images:{tmp_path} n=2")


def test_image_folder_needs_a_single_image_input(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(InputError) as e:
        C.load_calibration(tmp_path, C.input_specs(text_model()))
    assert "[N, C, H, W]" in one_sentence(e)
    np.save(tmp_path / "pixel_values.npy", np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="both .npy and image"):
        C.load_calibration(tmp_path, _vision_specs())


def test_image_folder_with_dynamic_size_needs_shape(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    model = vision_model(hw="H")
    with pytest.raises(InputError, match="--shape pixel_values="):
        C.load_calibration(tmp_path, C.input_specs(model))
    cal = C.load_calibration(tmp_path, C.input_specs(model), {"pixel_values": (1, 3, 6, 6)})
    assert cal.batches[0]["pixel_values"].shape == (1, 3, 6, 6)
