"""`--pass auto`: per site the fastest candidate the budget allows, with `--plan` / `--plan-in`.

On a synthetic ViT large enough that local variants are faster than softmax (24×24 grid + CLS), the
plan meets the budget as measured, only picks options faster than the site's original (by the timing
it reports), reports predicted and measured drift, and replays from its plan file to the same model.
Bad requests are one sentence and exit 2.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from attnrewrite.cli import main
from tests.conftest import ort_run

CANDIDATES = "auto:candidates=window:size=4x4|window:size=8x8|neighborhood:kernel=5|int8"


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip().startswith("{") else None), err


@pytest.fixture(scope="module")
def vit96(tmp_path_factory):
    from attnrewrite.synthetic import vit

    folder = tmp_path_factory.mktemp("vit96")
    onnx.save(vit(depth=3, img=(96, 96), patch=4, dim=32, heads=2), folder / "vit.onnx")
    np.savez(folder / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 3, 96, 96)).astype(np.float32))
    return folder / "vit.onnx", folder / "calib.npz"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_auto_plan_meets_the_budget_and_replays(capsys, tmp_path, vit96):
    model, calib = vit96
    rc, doc, err = run(capsys, model, "--pass", CANDIDATES, "--calib", calib, "-o", tmp_path / "a.onnx",
                       "--budget", "cosine>=0.99", "--plan", tmp_path / "plan.json", "--json")
    assert rc == 0, err
    p = doc["passes"][0]
    auto = p["auto"]
    assert p["metrics_vs_original"]["logits"]["cosine"] >= 0.99
    assert abs(auto["measured_drift"] - (1 - p["metrics_vs_original"]["logits"]["cosine"])) < 1e-9
    assert auto["predicted_drift"] is not None and auto["site_ms_plan"] <= auto["site_ms_original"]
    assert auto["predictor"].startswith("superposition of leave-one-in output changes plus in-context interactions")
    assert 0.0 <= auto["interaction_weight"] <= 1.0
    assert p["rewritten"], "local variants beat softmax at 577 tokens"
    for site in p["sites"]:
        plan = site["plan"]
        if site["status"] == "rewritten":
            assert plan["site ms"] < plan["original site ms"], plan
        assert any(key.endswith("ms / leave-one-in drift") for key in plan)
    assert (tmp_path / "cache" / "attnrewrite" / "site_costs.json").exists()
    written = json.loads((tmp_path / "plan.json").read_text())
    assert set(written["sites"]) == {s["id"] for s in p["sites"]}

    rc, replay, err = run(capsys, model, "--pass", "auto", "--plan-in", tmp_path / "plan.json", "--calib", calib,
                          "-o", tmp_path / "b.onnx", "--budget", "cosine>=0.99", "--json")
    assert rc == 0, err
    r = replay["passes"][0]
    assert r["auto"]["predicted_drift"] is None  # replayed, not searched
    assert [s["plan"]["chosen"] for s in r["sites"]] == [s["plan"]["chosen"] for s in p["sites"]]
    x = np.load(calib)["x"]
    np.testing.assert_allclose(ort_run(tmp_path / "b.onnx", {"x": x})["logits"],
                               ort_run(tmp_path / "a.onnx", {"x": x})["logits"], atol=1e-6)
    assert [i.name for i in onnx.load(tmp_path / "a.onnx").graph.input] == ["x"]


def test_a_tight_budget_keeps_more_sites_original(capsys, tmp_path, vit96):
    model, calib = vit96
    chosen = {}
    for budget in ("cosine>=0.9", "cosine>=0.99999"):
        # the first-order predictor alone (half the runs) plans by the same rules
        rc, doc, err = run(capsys, model, "--pass", CANDIDATES.replace("auto:", "auto:predictor=superposition,"),
                           "--calib", calib, "-o", tmp_path / "t.onnx", "--force", "--budget", budget, "--json")
        assert rc == 0, err
        p = doc["passes"][0]
        assert p["auto"]["predictor"] == "superposition of leave-one-in output changes"
        assert p["auto"]["interaction_weight"] is None
        chosen[budget] = p["auto"]["site_ms_plan"]
        assert p["metrics_vs_original"]["logits"]["cosine"] >= float(budget.split(">=")[1])
    assert chosen["cosine>=0.99999"] >= chosen["cosine>=0.9"]


@pytest.mark.parametrize("args,message", [
    (["--pass", "auto"], "needs a --budget"),
    (["--pass", "auto", "--pass", "int8", "--budget", "cosine>=0.9"], "give it alone"),
    (["--pass", "auto:candidates=bogus", "--budget", "cosine>=0.9"], "unknown pass"),
    (["--pass", "auto:sizes=3", "--budget", "cosine>=0.9"], "candidates=SPEC"),
    (["--pass", "auto", "--budget", "snr_db>=30"], "no perfect value"),
    (["--pass", "int8", "--plan", "p.json"], "go with --pass auto"),
])
def test_bad_requests_are_one_sentence(capsys, tmp_path, vit96, args, message):
    model, calib = vit96
    rc, _, err = run(capsys, model, "--calib", calib, "-o", tmp_path / "x.onnx", *args)
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_plan_in_naming_unknown_sites_is_refused(capsys, tmp_path, vit96):
    model, calib = vit96
    (tmp_path / "p.json").write_text(json.dumps({"sites": {"attn_99": "int8"}}))
    rc, _, err = run(capsys, model, "--pass", "auto", "--plan-in", tmp_path / "p.json", "--calib", calib,
                     "-o", tmp_path / "x.onnx", "--budget", "cosine>=0.9")
    assert rc == 2 and "attn_99" in err
    (tmp_path / "bad.json").write_text("[1, 2]")
    rc, _, err = run(capsys, model, "--pass", "auto", "--plan-in", tmp_path / "bad.json", "--calib", calib,
                     "-o", tmp_path / "x.onnx", "--budget", "cosine>=0.9")
    assert rc == 2 and "not a plan" in err


def _plans(*choices):
    """SitePlans with two options each (original, one candidate) and leave-one-in drift 0.01 apiece."""
    from attnrewrite.validate.auto import Option, SitePlan

    class Site:
        def __init__(self, i):
            self.id = f"attn_{i}"

    return [SitePlan(Site(i), [Option(None), Option(None, drift=0.01)], choice=c) for i, c in enumerate(choices)]


@pytest.mark.parametrize("direction,expected", [(1.0, "coherent"), (-1.0, "cancel")])
def test_superposition_sees_whether_site_changes_line_up(direction, expected):
    """Two sites that each move the output by e alone: together they move it by 2e when their changes
    line up (drift ~4× one site's, where a sum of drifts says 2×) and by 0 when they cancel. On a model
    whose outputs are linear in the changes the prediction is the measured metric exactly."""
    from attnrewrite.validate import metrics as M
    from attnrewrite.validate.auto import Superposition, _drift

    rng = np.random.default_rng(0)
    y = rng.standard_normal((8, 16))
    e = 0.1 * rng.standard_normal((8, 16))
    budget = M.parse_budget("cosine>=0.99")
    predictor = Superposition(budget, {"y": y}, ["y"])
    predictor.add("attn_0", 1, {"y": y + e})
    predictor.add("attn_1", 1, {"y": y + direction * e})
    one = _drift(budget, M.compare_outputs({"y": y}, {"y": y + e}))
    both = _drift(budget, M.compare_outputs({"y": y}, {"y": y + e + direction * e}))
    predicted = predictor.drift(_plans(1, 1))
    assert predicted == pytest.approx(both, rel=1e-5)
    assert predictor.drift(_plans(1, 0)) == pytest.approx(one, rel=1e-5)
    if expected == "coherent":
        assert predicted > 3 * one
    else:
        assert predicted < 1e-6
    assert predictor.kind.startswith("superposition")


def _pairwise_model(n=6, gamma=0.6, seed=0):
    """Outputs of a model whose sites interact pairwise: y(P) = y0 + Σ d_i + γ Σ_{i<j in P} (d_i ⊙ d_j)/s,
    a compounding that the leave-one-in runs cannot see."""
    rng = np.random.default_rng(seed)
    y0 = rng.standard_normal((4, 32))
    d = [0.08 * rng.standard_normal((4, 32)) for _ in range(n)]

    def outputs(plan: set[int]) -> dict[str, np.ndarray]:
        y = y0 + sum((d[i] for i in plan), np.zeros_like(y0))
        for i in plan:
            for j in plan:
                if i < j:
                    y = y + gamma * (d[i] * d[j] / 0.08 + 0.5 * (d[i] + d[j]))
        return {"y": y}

    return y0, outputs


def _anchored(outputs, y0, n, budget, allowed):
    from attnrewrite.validate.auto import Superposition

    predictor = Superposition(budget, {"y": y0}, ["y"])
    for i in range(n):
        predictor.add(f"attn_{i}", 1, outputs({i}))
    everywhere = set(range(n))
    predictor.add_anchor({f"attn_{i}": 1 for i in range(n)}, outputs(everywhere),
                         {f"attn_{i}": outputs(everywhere - {i}) for i in range(n)})
    predictor.fit(allowed)
    return predictor


def test_interactions_predict_the_compounding_the_superposition_misses():
    """Fitted on the candidate-everywhere plan only, the interaction term predicts plans it never saw
    (half the sites, two thirds) far closer than the first-order superposition, which undershoots."""
    from attnrewrite.validate import metrics as M
    from attnrewrite.validate.auto import _drift

    n, budget = 6, M.parse_budget("cosine>=0.99")
    y0, outputs = _pairwise_model(n)
    predictor = _anchored(outputs, y0, n, budget, allowed=0.05)
    assert 0.3 <= predictor.weight <= 0.7  # 1/2 is exact for purely pairwise interactions at full reach
    for on in ({0, 2, 4}, {1, 2, 3, 5}, {0, 1}):
        choices = [int(i in on) for i in range(n)]
        measured = _drift(budget, M.compare_outputs({"y": y0}, outputs(on)))
        weight, predictor.weight = predictor.weight, 0.0
        first_order = predictor.drift(_plans(*choices))
        predictor.weight = weight
        predicted = predictor.drift(_plans(*choices))
        assert first_order < measured
        assert abs(predicted - measured) < 0.5 * abs(first_order - measured), (on, measured, predicted, first_order)
    assert "weight" in predictor.kind and "1 of 1" in predictor.kind


def test_interactions_stay_out_of_an_additive_model():
    """Without compounding the in-context changes equal the leave-one-in ones: the prediction is the
    superposition's, whatever weight is fitted."""
    from attnrewrite.validate import metrics as M

    n, budget = 5, M.parse_budget("cosine>=0.99")
    y0, outputs = _pairwise_model(n, gamma=0.0)
    predictor = _anchored(outputs, y0, n, budget, allowed=0.05)
    plan = _plans(1, 0, 1, 1, 0)
    with_weight = predictor.drift(plan)
    predictor.weight = 0.0
    assert with_weight == pytest.approx(predictor.drift(plan), rel=1e-5)


def test_anchors_far_outside_the_budget_do_not_fit_the_weight():
    from attnrewrite.validate import metrics as M

    n, budget = 6, M.parse_budget("cosine>=0.99")
    y0, outputs = _pairwise_model(n)
    predictor = _anchored(outputs, y0, n, budget, allowed=1e-5)
    assert predictor.weight == 0.0 and "fitted on 0 of 1" in predictor.kind


def test_superposition_falls_back_to_the_sum_when_changes_are_too_large(monkeypatch):
    from attnrewrite.validate import auto
    from attnrewrite.validate import metrics as M

    monkeypatch.setattr(auto, "SUPERPOSE_BYTES", 100)
    y = np.ones((8, 16))
    predictor = auto.Superposition(M.parse_budget("cosine>=0.99"), {"y": y}, ["y"])
    predictor.add("attn_0", 1, {"y": y * 1.5})
    assert predictor.kind == "sum of leave-one-in drifts"
    assert predictor.drift(_plans(1, 1)) == pytest.approx(0.02)


def test_default_candidates_span_every_family():
    """The issue's default: every spatial, linear and quantised variant at a few sizes; each a valid --pass."""
    from attnrewrite.validate.auto import parse_auto

    specs = parse_auto("auto").candidates
    names = {s.name for s in specs}
    assert {"window", "grid", "neighborhood", "int8", "linear"} <= names
    linear = [s.text for s in specs if s.name == "linear"]
    assert "linear" in linear and any("local=" in t for t in linear)  # plain kernel attention and the hybrid
    assert len({s.text for s in specs}) == len(specs)


class _SumOfDrifts:
    """The additive predictor, under which the best plan is a plain multiple-choice knapsack."""

    def drift(self, live):
        return sum(p.options[p.choice].drift for p in live)


def _menu(table, original_ms):
    """SitePlans from [(ms, drift), ...] per site; option 0 is the original (its ms, no drift)."""
    from attnrewrite.validate.auto import Option, SitePlan

    class Site:
        def __init__(self, i):
            self.id = f"attn_{i}"

    return [SitePlan(Site(i), [Option(None, ms=original_ms)] + [Option(None, j, ms=m, drift=d) for j, (m, d) in enumerate(row)])
            for i, row in enumerate(table)]


def _brute_force(live, cap):
    """Fewest total ms over every assignment whose summed drift is within `cap` (options worth their drift)."""
    import itertools

    from attnrewrite.validate.auto import MIN_GAIN

    menus = [[o for i, o in enumerate(p.options) if i == 0 or o.ms < MIN_GAIN * p.options[0].ms] for p in live]
    return min(sum(o.ms for o in combo) for combo in itertools.product(*menus) if sum(o.drift for o in combo) <= cap)


def test_search_finds_the_mixed_plan_greedy_stepping_missed():
    """Measured on the digits ViT at 1025 tokens (ms, leave-one-in drift; softmax 3.263 ms): greedy
    stepping from the fastest option kept attn_1 on softmax; the best plan buys attn_1 a 17×17
    neighbourhood by putting 8×8 windows (not 4×4) on attn_2-3."""
    from attnrewrite.validate import auto

    ms = (0.546, 0.590, 1.174, 2.837)  # window 4×4, 8×8, 16×16, neighbourhood 17×17
    drifts = ((0.26, 0.21, 0.172, 0.15), (0.0408, 0.0241, 0.0167, 0.00648), (0.0022, 0.00155, 0.000516, 0.000354),
              (0.00268, 0.00175, 0.000607, 0.00045), (9.42e-05, 6.26e-05, 1.25e-05, 9.56e-06))
    table = [list(zip(ms, row)) for row in drifts]
    greedy = _menu(table, 3.263)
    for p in greedy:
        p.choice = auto._fastest(p)
    while _SumOfDrifts().drift(greedy) > 0.01 and auto._step(greedy):
        pass
    live = _menu(table, 3.263)
    auto._search(live, _SumOfDrifts(), 0.01)
    plan_ms = sum(p.options[p.choice].ms for p in live)
    assert _SumOfDrifts().drift(live) <= 0.01
    assert [p.options[p.choice].ms for p in live] == [3.263, 2.837, 0.590, 0.590, 0.546]
    assert plan_ms == pytest.approx(_brute_force(live, 0.01))
    assert plan_ms < sum(p.options[p.choice].ms for p in greedy) - 0.3


@pytest.mark.parametrize("seed", range(6))
def test_search_is_the_knapsack_optimum_on_additive_drift(seed):
    """On random menus the search's plan fits the budget and is at least as fast as the best plan with
    room for the knapsack's rounding (every drift rounded up to 1/UNITS of the cap)."""
    from attnrewrite.validate import auto

    rng = np.random.default_rng(seed)
    sites, options = 5, 3
    table = [[(float(rng.uniform(0.2, 3.0)), float(rng.uniform(0, 0.006))) for _ in range(options)] for _ in range(sites)]
    live = _menu(table, 3.0)
    auto._search(live, _SumOfDrifts(), 0.01)
    assert _SumOfDrifts().drift(live) <= 0.01
    slack = 0.01 * (1 - sites / auto.UNITS)
    assert sum(p.options[p.choice].ms for p in live) <= _brute_force(live, slack) + 1e-9


def test_search_obeys_a_predictor_stricter_than_the_sum():
    """Changes that line up cost more than their sum: the plan must pass the predictor, not the sum."""
    from attnrewrite.validate import auto

    class Coherent:
        def drift(self, live):  # two aligned changes: norms add, so drift grows with the square of the count
            d = [p.options[p.choice].drift for p in live if p.choice]
            return len(d) * sum(d)

    live = _menu([[(0.5, 0.004)]] * 4, 3.0)  # the sum allows two sites; the predictor only one
    auto._search(live, Coherent(), 0.01)
    assert Coherent().drift(live) <= 0.01 and sum(p.choice for p in live) == 1


def test_search_never_picks_an_option_whose_drift_is_not_a_number():
    from attnrewrite.validate import auto

    live = _menu([[(0.5, float("nan")), (1.0, 0.001)], [(0.5, float("inf"))]], 3.0)
    auto._search(live, _SumOfDrifts(), 0.01)
    assert [p.choice for p in live] == [2, 0]


class _PartlyAligned:
    """Site changes half aligned: drift between the plain sum and the square of the summed roots."""

    def drift(self, live):
        d = np.array([p.options[p.choice].drift for p in live if p.choice])
        return float(0.5 * d.sum() + 0.5 * np.sqrt(d).sum() ** 2) if len(d) else 0.0


def _fallback_ms(live, j, predictor, allowed):
    """Candidate j alone as --fallback keeps it: everywhere it is worth its drift, the most sensitive
    sites back to the original until the prediction fits, then each tried again, least sensitive first."""
    from attnrewrite.validate.auto import MIN_GAIN

    for p in live:
        p.choice = j + 1 if p.options[j + 1].ms < MIN_GAIN * p.options[0].ms else 0
    reverted = []
    for p in sorted((p for p in live if p.choice), key=lambda p: -p.options[p.choice].drift):
        if predictor.drift(live) <= allowed:
            break
        p.choice = 0
        reverted.append(p)
    for p in reversed(reverted):
        p.choice = j + 1
        if predictor.drift(live) > allowed:
            p.choice = 0
    return sum(p.options[p.choice].ms for p in live)


@pytest.mark.parametrize("seed", [4, 15, 62, 0, 1])
def test_auto_is_never_slower_than_a_single_candidate_by_the_prediction(seed):
    """Seeds 4, 15 and 62 are menus where the knapsack and greedy plans alone lost to one candidate
    applied the fallback way, once the predictor is not additive."""
    from attnrewrite.validate import auto

    rng = np.random.default_rng(seed)
    table = [[(float(rng.uniform(0.2, 3.0)), float(rng.uniform(0, 0.006))) for _ in range(3)] for _ in range(6)]
    live = _menu(table, 3.0)
    auto._search(live, _PartlyAligned(), 0.01)
    assert _PartlyAligned().drift(live) <= 0.01
    plan_ms = sum(p.options[p.choice].ms for p in live)
    best_single = min(_fallback_ms(_menu(table, 3.0), j, _PartlyAligned(), 0.01) for j in range(3))
    assert plan_ms <= best_single + 1e-9


def test_headroom_plans_inside_the_budget_and_gates_at_it(capsys, tmp_path, vit96):
    """headroom=F fits the plan within (1 - F) of the budget's drift (the margin a plan fitted to the
    calibration data needs on unseen inputs); the gate, and the exit code, stay at the budget."""
    model, calib = vit96
    drift = {}
    for headroom in (0.0, 0.6):
        rc, doc, err = run(capsys, model, "--pass", f"auto:headroom={headroom},{CANDIDATES.partition(':')[2]}",
                           "--calib", calib, "-o", tmp_path / "h.onnx", "--force", "--budget", "cosine>=0.9", "--json")
        assert rc == 0, err
        p = doc["passes"][0]
        assert p["params"]["headroom"] == headroom and p["params"]["candidates"].startswith("window:size=4x4|")
        assert p["auto"]["planned_within"] == pytest.approx(0.1 * (1 - headroom))
        drift[headroom] = p["auto"]["measured_drift"]
    assert drift[0.0] > 0.04, "without headroom the plan spends more than what 0.6 leaves: the test could not fail"
    assert drift[0.6] <= 0.04 + 1e-12


def test_auto_options_parse_with_candidates_last():
    from attnrewrite.validate.auto import parse_auto

    options = parse_auto("auto:headroom=0.25,candidates=window:size=4x4|linear:local=8x8,phi=relu")
    assert options.headroom == 0.25
    assert [s.text for s in options.candidates] == ["window:size=4x4", "linear:local=8x8,phi=relu"]
    assert parse_auto("auto").headroom == 0.0 and parse_auto("auto:headroom=0.5").candidates == parse_auto("auto").candidates
    assert parse_auto("auto").predictor == "interactions"
    assert parse_auto("auto:predictor=superposition,headroom=0.1").predictor == "superposition"


@pytest.mark.parametrize("text", ["auto:headroom=1", "auto:headroom=-0.1", "auto:headroom=lots",
                                  "auto:headroom=0.2,sizes=3", "auto:predictor=oracle"])
def test_bad_auto_options_are_usage_errors_before_any_run(capsys, tmp_path, text):
    rc, _, err = run(capsys, tmp_path / "missing.onnx", "--pass", text, "--budget", "cosine>=0.9")
    assert rc == 2 and ("headroom" in err or "candidates=SPEC" in err) and "Traceback" not in err, err
