"""Drift metrics against hand-computed numbers, and budget parsing/checking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnrewrite.validate import metrics as M
from attnrewrite.errors import AttnRewriteError, InputError

REF = np.array([[3.0, 4.0], [6.0, 8.0]], np.float32)
TEST = np.array([[3.0, 4.0], [6.0, 9.0]], np.float32)  # one element off by exactly 1


def test_identical_outputs_are_perfect_and_snr_is_capped():
    x = np.random.default_rng(0).standard_normal((4, 3, 10)).astype(np.float32)
    m = M.compare(x, x.copy())
    assert m["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert m["cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert m["cosine_global"] == pytest.approx(1.0, abs=1e-12)
    assert m["rel_l2"] == 0.0 and m["max_abs"] == 0.0 and m["nonfinite"] == 0.0
    assert m["snr_db"] == M.SNR_CAP_DB == 200.0
    assert m["top1"] == 1.0


def test_known_perturbation_matches_hand_computed_values():
    m = M.compare(REF, TEST)
    assert m["rel_l2"] == pytest.approx(1 / math.sqrt(125), rel=1e-12)  # ‖ref‖² = 9+16+36+64
    assert m["max_abs"] == 1.0
    assert m["snr_db"] == pytest.approx(10 * math.log10(125), rel=1e-12)
    row1 = (36 + 72) / (10 * math.sqrt(36 + 81))
    assert m["cosine"] == pytest.approx((1.0 + row1) / 2, rel=1e-12)
    assert m["cosine_min"] == pytest.approx(row1, rel=1e-12)
    assert m["cosine_global"] == pytest.approx((9 + 16 + 36 + 72) / math.sqrt(125 * 142), rel=1e-12)
    assert m["top1"] == 1.0  # argmax is column 1 in both rows of both runs


def test_cosine_is_a_per_sample_mean_so_one_bad_sample_shows():
    ref = np.ones((4, 100), np.float32)
    test = ref.copy()
    test[2] = -1.0  # one sample flipped; globally this is cosine 0.5
    m = M.compare(ref, test)
    assert m["cosine"] == pytest.approx(0.5) and m["cosine_min"] == pytest.approx(-1.0)
    ref[0] *= 1000  # now the big sample dominates the global cosine, but not the per-sample mean
    test[0] *= 1000
    m = M.compare(ref, test)
    assert m["cosine"] == pytest.approx(0.5) and m["cosine_global"] > 0.99


def test_top1_counts_flipped_argmax_positions():
    ref = np.array([[[1.0, 2.0], [5.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]], np.float32)
    test = ref.copy()
    test[0, 0] = [2.5, 2.0]  # 1 of 4 positions flips
    assert M.compare(ref, test)["top1"] == 0.75


@pytest.mark.parametrize("array", [
    np.zeros((5,), np.float32),  # rank 1
    np.zeros((3, 1), np.float32),  # one class
    np.zeros((2, 4), np.int64),  # not float
    np.zeros((1, 100_001), np.float32),  # too many classes to be logits
])
def test_top1_only_for_logits_like_outputs(array):
    assert "top1" not in M.compare(array, array)


def test_zero_outputs():
    z = np.zeros((2, 3), np.float32)
    m = M.compare(z, z)
    assert m["cosine"] == 1.0 and m["rel_l2"] == 0.0 and m["snr_db"] == M.SNR_CAP_DB
    m = M.compare(z, z + 1)
    assert m["cosine"] == 0.0 and m["rel_l2"] == math.inf and m["snr_db"] == -M.SNR_CAP_DB and m["max_abs"] == 1.0


def test_nonfinite_test_output_is_maximally_bad_but_shared_infinities_are_equal():
    ref = np.array([[1.0, -np.inf, 2.0]], np.float32)
    same = ref.copy()
    same[0, 2] = 2.5
    m = M.compare(ref, same)  # the shared -inf (a masked logit) is equal and left out
    assert m["nonfinite"] == 0.0 and m["max_abs"] == 0.5
    assert m["rel_l2"] == pytest.approx(0.5 / math.sqrt(5), rel=1e-12)
    broken = ref.copy()
    broken[0, 0] = np.nan
    m = M.compare(ref, broken)
    assert m["nonfinite"] == 1.0 and math.isnan(m["cosine"]) and m["rel_l2"] == math.inf
    assert m["snr_db"] == -M.SNR_CAP_DB and m["top1"] == 0.0


def test_bool_outputs_compare_as_numbers():
    a = np.array([[True, False, True, True]])
    m = M.compare(a, ~a)
    assert m["max_abs"] == 1.0 and m["rel_l2"] == pytest.approx(math.sqrt(4 / 3))


def test_shape_mismatch_is_a_runtime_error():
    with pytest.raises(AttnRewriteError, match=r"\(2, 2\) vs \(2, 3\)"):
        M.compare(REF, np.zeros((2, 3), np.float32))


def test_compare_outputs_accepts_lists_of_batches():
    rng = np.random.default_rng(1)
    ref = [{"y": rng.standard_normal((1, 5)), "s": np.float32(2.0)} for _ in range(3)]
    test = [{"y": b["y"] + 0.01, "s": np.float32(2.0)} for b in ref]
    joined = M.concat_batches(ref)
    assert joined["y"].shape == (3, 5) and joined["s"].shape == (3,)
    by_list = M.compare_outputs(ref, test)
    by_dict = M.compare_outputs(M.concat_batches(ref), M.concat_batches(test))
    assert by_list == by_dict
    assert by_list["y"]["max_abs"] == pytest.approx(0.01)
    with pytest.raises(AttnRewriteError, match="lacks outputs"):
        M.compare_outputs({"y": REF}, {"z": REF})


def test_site_metrics_keys():
    assert set(M.site_metrics(REF, TEST)) == {"cosine", "rel_l2", "max_abs"}


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("text, want", [
    ("cosine>=0.999", ("cosine", ">=", 0.999)),
    (" rel_l2 < 1e-2 ", ("rel_l2", "<", 0.01)),
    ("max_abs<=0.5", ("max_abs", "<=", 0.5)),
    ("snr_db>40", ("snr_db", ">", 40.0)),
    ("top1>=0.99", ("top1", ">=", 0.99)),
    ("cosine=0.99", ("cosine", ">=", 0.99)),  # natural direction
    ("rel_l2:0.05", ("rel_l2", "<=", 0.05)),
])
def test_parse_budget(text, want):
    b = M.parse_budget(text)
    assert (b.metric, b.op, b.threshold) == want


@pytest.mark.parametrize("text, needle", [
    ("cosine", "cannot read budget"),
    ("accuracy>=0.9", "valid metrics: cosine"),
    ("cosine>=abc", "not a number"),
    ("cosine>=nan", "NaN"),
    ("", "cannot read budget"),
])
def test_parse_budget_errors(text, needle):
    with pytest.raises(InputError) as e:
        M.parse_budget(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_budget_text_lists_valid_metrics():
    with pytest.raises(InputError) as e:
        M.parse_budget("cos >> 1")
    assert all(m in str(e.value) for m in ("cosine", "rel_l2", "max_abs", "snr_db", "top1"))


def test_budget_str_round_trips():
    for text in ("cosine>=0.999", "rel_l2<0.01", "max_abs<=0.0001"):
        assert M.parse_budget(str(M.parse_budget(text))) == M.parse_budget(text)


METRICS = {
    "logits": {"cosine": 0.9999, "rel_l2": 0.001, "max_abs": 0.3, "top1": 0.97},
    "hidden": {"cosine": 0.99, "rel_l2": 0.02, "max_abs": 0.1},
}


def test_worst_output_decides():
    (fail,) = M.check_budgets([M.parse_budget("cosine>=0.999")], METRICS)
    assert fail.output == "hidden" and fail.value == 0.99
    assert str(fail).startswith("cosine>=0.999") and "hidden" in str(fail)
    (fail,) = M.check_budgets([M.parse_budget("max_abs<=0.2")], METRICS)
    assert fail.output == "logits" and fail.value == 0.3
    assert M.check_budgets([M.parse_budget("cosine>=0.98"), M.parse_budget("rel_l2<0.05")], METRICS) == []


def test_strict_operators_fail_at_the_threshold():
    assert M.check_budgets([M.parse_budget("cosine>=0.99")], METRICS) == []
    assert len(M.check_budgets([M.parse_budget("cosine>0.99")], METRICS)) == 1


def test_top1_budget_applies_only_to_outputs_with_top1():
    assert M.check_budgets([M.parse_budget("top1>=0.95")], METRICS) == []
    (fail,) = M.check_budgets([M.parse_budget("top1>=0.99")], METRICS)
    assert fail.output == "logits"


def test_budget_on_a_metric_no_output_has_fails_loudly():
    (fail,) = M.check_budgets([M.parse_budget("top1>=0.5")], {"hidden": METRICS["hidden"]})
    assert fail.output is None and "no output has metric top1" in str(fail)


def test_nan_never_passes_and_is_the_worst():
    metrics = {"a": {"cosine": 0.5}, "b": {"cosine": math.nan}}
    (fail,) = M.check_budgets([M.parse_budget("cosine>=-1")], metrics)
    assert fail.output == "b"


@pytest.mark.parametrize("text, output", [
    ("logits:cosine>=0.999", "logits"), ("encoder/out:0:top1=0.9", "encoder/out:0"), ("cosine:0.9", None),
])
def test_budget_scoped_to_one_output(text, output):
    b = M.parse_budget(text)
    assert b.output == output
    assert M.parse_budget(str(b)) == b


def test_scoped_budget_ignores_other_outputs():
    assert M.check_budgets([M.parse_budget("logits:cosine>=0.999")], METRICS) == []
    (fail,) = M.check_budgets([M.parse_budget("hidden:cosine>=0.999")], METRICS)
    assert fail.output == "hidden" and str(fail).startswith("hidden:cosine>=0.999")
    (fail,) = M.check_budgets([M.parse_budget("hidden:top1>=0.5")], METRICS)
    assert "output 'hidden' does not have metric top1" in str(fail)


def test_scope_must_name_a_model_output():
    M.check_output_names([M.parse_budget("logits:cosine>=0.9")], ["logits"])
    with pytest.raises(InputError, match="outputs are 'logits'"):
        M.check_output_names([M.parse_budget("logitz:cosine>=0.9")], ["logits"])
