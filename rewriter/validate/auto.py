"""`--pass auto`: per site, the fastest candidate variant that keeps the whole model within budget.

Cost is measured, not guessed: each (site, candidate) rewrite is timed alone on this machine
(`lone.py`) next to the site's original softmax, interleaved in one process. Sites with the same
shapes and semantics share one timing, and timings are cached per model and shape in
`$XDG_CACHE_HOME/attnrewrite/site_costs.json`.

Drift is measured too: every candidate is written beside the original at every site it applies to,
and one gated session (`sensitivity.gate`) runs the model under any assignment of candidates, so
each (site, candidate)'s leave-one-in drift costs one run. A plan's drift is *predicted* by
superposition: the model's outputs under the plan are taken to be the original outputs plus each chosen
option's leave-one-in change, and the budget metric is computed on that sum, as a distance from its
perfect value (1 − cosine, rel_l2, ...). Unlike a sum of per-site drifts this sees whether two sites
push the output the same way (their changes add coherently) or not; where the changes are too large to
keep (`SUPERPOSE_BYTES`) the plain sum is used, and the report says which predictor ran.
Search: choosing one option per site to minimise total ms under one drift budget is a multiple-choice
knapsack; it is solved exactly on the leave-one-in drifts at a few caps around the budget, and the
fastest of those plans that the predictor keeps within budget is taken, or, if faster, each candidate
alone as `--fallback` keeps it, or the plan of greedy stepping (from the fastest option everywhere, while the prediction exceeds the budget the site whose
step to a more accurate option buys the most drift per millisecond takes it); then,
while a site can go to a faster option with the prediction still in budget, the one saving the most
time per drift does; then the real plan is measured, and while it misses the budget (drift is not additive)
stepping goes on. The report gives the final plan's predicted drift (made before measuring it) against
its measured drift, and the site time the plan saves; `--plan` writes the choice and `--plan-in`
replays one without searching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from attnrewrite.errors import InputError
from attnrewrite.onnx.canonicalize import canonicalize
from attnrewrite.onnx.detect import detect
from attnrewrite.registry import PassSpec, parse_pass
from attnrewrite.select import select
from attnrewrite.validate import bench as B
from attnrewrite.validate import lone
from attnrewrite.validate import metrics as M
from attnrewrite.validate import sensitivity as S
from attnrewrite.validate.runner import make_session, run_batches

#: tried at every site where they apply (sizes wider than the grid are declined by the pass itself):
#: local reach (windows, neighbourhoods), strided global reach (MaxViT grid), linear and quantised, because
#: sites of one model disagree about reach: a trained ViT's first sites tolerate a grid, not a window
DEFAULT_CANDIDATES = ("window:size=4x4", "window:size=8x8", "window:size=16x16", "grid:size=4x4", "grid:size=8x8",
                      "neighborhood:kernel=5", "neighborhood:kernel=9", "neighborhood:kernel=17", "int8", "linear",
                      "linear:local=8x8")
#: leave-one-in output changes kept for the superposition predictor (beyond it: the sum of drifts)
SUPERPOSE_BYTES = 2 << 30
#: how a plan's drift is predicted from measured runs (see `Superposition` and `Superposition.fit`)
PREDICTORS = ("interactions", "superposition")
#: the value of each metric when nothing changed; a plan's drift is its distance from it
PERFECT = {"cosine": 1.0, "top1": 1.0, "rel_l2": 0.0, "max_abs": 0.0}


@dataclasses.dataclass(frozen=True)
class AutoOptions:
    """`--pass auto[:headroom=F][,candidates=SPEC|SPEC|...]`.

    `headroom` plans within (1 - F) of the budget's drift while the gate stays at the budget: the plan
    is fitted to the calibration data, and one that spends the budget to its edge there can miss it on
    unseen inputs (a 1025-token digits ViT: 0.9908 on calibration, 0.9890 held out, at cosine>=0.99).
    """

    candidates: list[PassSpec]
    headroom: float = 0.0
    candidates_text: str = "default"  # as given, for the report
    predictor: str = "interactions"  # or "superposition": half the runs, blind to compounding

    @property
    def params(self) -> dict:
        return {"candidates": self.candidates_text, "headroom": self.headroom, "predictor": self.predictor}


def parse_auto(text: str) -> AutoOptions:
    """Options come as key=value separated by commas; `candidates` goes last, since its specs carry commas."""
    _, _, rest = text.partition(":")
    headroom, candidates, given, predictor = 0.0, None, "default", "interactions"
    while rest.strip():
        key, _, value = rest.partition("=")
        key = key.strip()
        if key == "candidates" and value.strip():
            candidates, given = [parse_pass(c.strip()) for c in value.split("|") if c.strip()], value.strip()
            break
        value, _, rest = value.partition(",")
        if key == "predictor" and value.strip() in PREDICTORS:
            predictor = value.strip()
        elif key == "headroom":
            headroom = _fraction(value, text)
        else:
            raise InputError(f"--pass {text!r}: auto takes headroom=F, predictor={'|'.join(PREDICTORS)} and "
                             "candidates=SPEC|SPEC|... (last), e.g. auto:headroom=0.3,candidates=window:size=4x4|int8.")
    if candidates is None:
        candidates = [parse_pass(c) for c in DEFAULT_CANDIDATES]
    if any(s.name == "auto" for s in candidates):
        raise InputError("auto cannot be its own candidate.")
    return AutoOptions(candidates, headroom, given, predictor)


def _fraction(value: str, text: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0.0 <= number < 1.0:
        raise InputError(f"--pass {text!r}: headroom is the share of the budget's drift kept unspent, a number in "
                         f"[0, 1); got {value.strip()!r}.")
    return number


@dataclasses.dataclass
class Option:
    """One way to run a site: a candidate's rewrite (or the original, `spec` None)."""

    spec: PassSpec | None
    candidate: int = -1  # which of auto's candidates (-1: the original)
    value: ir.Value | None = None
    plan: object = None
    ms: float = 0.0
    drift: float = 0.0  # leave-one-in, distance from perfect on the budget metric
    local: dict | None = None
    alone: dict | None = None

    @property
    def label(self) -> str:
        return self.spec.label() if self.spec else "original"


@dataclasses.dataclass
class SitePlan:
    site: object
    options: list[Option]  # options[0] is the original
    choice: int = 0
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # candidate label -> why not here


def plan_auto(pipeline, model: ir.Model, options: AutoOptions, plan_in: dict | None = None) -> dict:
    """Choose, apply and validate; returns the report section (`auto`) and per-site outcomes."""
    if not pipeline.budgets:
        raise InputError("--pass auto needs a --budget: it picks the fastest variants the budget allows.")
    budget = pipeline.budgets[0]
    if budget.metric not in PERFECT:
        raise InputError(f"--pass auto plans against the first budget's metric, and {budget.metric} has no perfect "
                         f"value to measure drift from; use one of {', '.join(PERFECT)} first.")
    start = time.perf_counter()
    canonicalize(model)
    sites = pipeline._check_bias_rows(model, detect(model).sites)
    chosen = select(sites, pipeline.selectors) if pipeline.selectors else list(sites)
    candidates = options.candidates
    if plan_in is not None:
        chosen, candidates = _replay(chosen, plan_in)
    plans = {s.id: SitePlan(s, [Option(None)]) for s in chosen}
    for index, spec in enumerate(candidates):
        _add_candidate(pipeline, model, spec, index, plans, plan_in)
    live = [p for p in plans.values() if len(p.options) > 1]
    if not live:
        return _document(pipeline, plans, start, predicted=0.0, measured=None, steps=0, repairs=0, predictor=None,
                         relaxed=0, limit=None)
    shapes = _shapes(pipeline, model, [p.site for p in live])
    _time(model, live, shapes, pipeline.path)
    _local_drift(pipeline, model, live)
    gated = S.gate(model, [p.site for p in live], [[o.value for o in p.options[1:]] for p in live], pipeline.base_dir)
    outputs = pipeline.output_names

    def run(selection: dict[str, int], tick=None) -> dict[str, np.ndarray]:
        return gated.run(selection, pipeline.batches, outputs, tick)

    allowed = abs(budget.threshold - PERFECT[budget.metric]) * (1.0 - options.headroom)

    def missed(metrics) -> bool:
        return bool(M.check_budgets(pipeline.budgets, metrics)) or _drift(budget, metrics) > allowed
    steps = repairs = relaxed = 0
    predictor = Superposition(budget, pipeline.original_outputs, outputs)
    if plan_in is None:
        runs = sum(len(p.options) - 1 for p in live)
        with pipeline.progress.task("auto: leave-one-in drift per site and candidate", runs * len(pipeline.batches)) as tick:
            for p in live:
                for i, option in enumerate(p.options[1:], 1):
                    changed = run({p.site.id: i}, tick)
                    metrics = S.compare(pipeline.original_outputs, changed, outputs)
                    option.drift, option.alone = _drift(budget, metrics), S.summary(metrics)
                    predictor.add(p.site.id, i, changed)
        if options.predictor == "interactions" and predictor.changes is not None:  # else nothing keeps the runs
            _anchor(pipeline, live, predictor, run)
            predictor.fit(allowed)
        steps, relaxed = _search(live, predictor, allowed)
    else:
        for p in live:
            p.choice = len(p.options) - 1  # the replayed candidate (original when the plan kept it)
    selection = {p.site.id: p.choice for p in live}
    predicted = predictor.drift(live) if plan_in is None else None
    with pipeline.progress.task("auto: validating the plan", 1) as tick:
        measured_metrics = S.compare(pipeline.original_outputs, run(selection), outputs)
        tick()
    while plan_in is None and missed(measured_metrics) and _step(live):
        repairs += 1
        selection = {p.site.id: p.choice for p in live}
        predicted = predictor.drift(live)  # the repaired plan's own prediction, made before measuring it
        measured_metrics = S.compare(pipeline.original_outputs, run(selection), outputs)
    gated.close(selection)
    return _document(pipeline, plans, start, predicted=predicted, measured=_drift(budget, measured_metrics),
                     steps=steps, repairs=repairs, predictor=predictor if plan_in is None else None,
                     relaxed=relaxed, limit=allowed if plan_in is None else None)


class Superposition:
    """Predicted plan drift from measured runs: outputs ≈ original + Σ (each chosen option's leave-one-in
    change). First-order in the changes, it captures what a sum of drifts cannot: changes that line up add
    their norms, orthogonal ones add their squares. Falls back to the sum of drifts when the changes would
    not fit in SUPERPOSE_BYTES.

    Rewritten sites compound: on a random-weight ViT-B/16 @ 512² with a grid at all 12 sites, each site's
    change *in context* (the plan less that site) was 1.6-2.4× its leave-one-in change and only 0.4-0.6
    aligned with it, and the plan drifted 0.0117 where the sum predicted 0.0054. With `interactions`,
    each candidate is also run everywhere it applies less one site at a time (its anchor), which measures
    each option's change in context, and a chosen option adds

        weight · reach · (in-context change − leave-one-in change)

    where reach is how much the plan's other sites change the output (the norms of their leave-one-in
    changes) relative to the anchor's other sites: a pairwise interaction grows with its partner. The one
    `weight` is fitted (0 to 1) so that the anchors near the budget are predicted as measured: 1/2 would be
    exact if interactions were only pairwise; on the ViT-B they saturate and it came out 0.40."""

    #: anchors up to this multiple of the allowed drift fit the weight; further out compounding is another regime
    FIT_REGIME = 4.0

    def __init__(self, budget, original: dict[str, np.ndarray], names: list[str]):
        self.budget = budget
        self.names = [n for n in names if budget.output in (None, n)]
        self.original = {n: np.asarray(original[n]) for n in self.names}
        self.changes: dict[tuple[str, int], dict[str, np.ndarray]] | None = {}
        self.context: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.sizes: dict[tuple[str, int], float] = {}
        self.anchor_rest: dict[tuple[str, int], float] = {}
        self.anchors: list[tuple[dict[str, int], float]] = []  # (selection, measured drift)
        self.weight: float | None = None  # fitted interaction weight; None: interactions not used
        self._fitted = 0
        self.bytes = 0

    @property
    def kind(self) -> str:
        if self.changes is None:
            return "sum of leave-one-in drifts"
        if self.weight is None:
            return "superposition of leave-one-in output changes"
        return (f"superposition of leave-one-in output changes plus in-context interactions (weight {self.weight:.2f} "
                f"fitted on {self._fitted} of {len(self.anchors)} candidate-everywhere plans)")

    def _change(self, outputs: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        change = {n: (np.asarray(outputs[n], np.float64) - np.asarray(base[n], np.float64)).astype(np.float32)
                  for n in self.names if np.issubdtype(np.asarray(outputs[n]).dtype, np.floating)}
        self.bytes += sum(c.nbytes for c in change.values())
        if self.bytes > SUPERPOSE_BYTES:
            self.changes, self.context = None, {}
        return change

    def add(self, site_id: str, index: int, outputs: dict[str, np.ndarray]) -> None:
        """The leave-one-in run of option `index` at `site_id`."""
        if self.changes is None:
            return
        change = self._change(outputs, self.original)
        if self.changes is not None:
            self.changes[site_id, index] = change
            self.sizes[site_id, index] = float(np.sqrt(sum(np.sum(np.square(c, dtype=np.float64)) for c in change.values())))

    def add_anchor(self, selection: dict[str, int], outputs: dict[str, np.ndarray], without: dict[str, dict]) -> None:
        """One candidate everywhere it applies (`selection`, its `outputs`), and the runs `without` each site."""
        if self.changes is None:
            return
        self.anchors.append((selection, _drift(self.budget, M.compare_outputs(
            self.original, {n: outputs[n] for n in self.original}))))
        for site_id, index in selection.items():
            change = self._change(outputs, without[site_id])
            if self.changes is None:
                return
            self.context[site_id, index] = change
            self.anchor_rest[site_id, index] = sum(self.sizes[j, i] for j, i in selection.items() if j != site_id)

    def fit(self, allowed: float) -> None:
        """The interaction weight that predicts the anchors near the budget best (in log drift)."""
        near = [(sel, d) for sel, d in self.anchors if 0 < d <= self.FIT_REGIME * allowed]
        self._fitted = len(near)
        if self.changes is None or not near:
            self.weight = 0.0 if self.changes is not None and self.anchors else None
            return
        weights = np.linspace(0.0, 1.0, 21)

        def error(w: float) -> float:
            return sum((np.log(max(self._predict(list(sel.items()), w), 1e-12)) - np.log(d)) ** 2 for sel, d in near)

        self.weight = float(weights[int(np.argmin([error(w) for w in weights]))])

    def drift(self, live: list[SitePlan]) -> float:
        chosen = [(p.site.id, p.choice) for p in live if p.choice]
        if self.changes is None or not chosen:
            return float(sum(p.options[p.choice].drift for p in live))
        return self._predict(chosen, self.weight or 0.0)

    def _predict(self, chosen: list[tuple[str, int]], weight: float) -> float:
        outputs = {n: self.original[n].astype(np.float32, copy=True) for n in self.names}
        total = sum(self.sizes[key] for key in chosen)
        for key in chosen:
            change, context = self.changes[key], self.context.get(key)
            reach = (total - self.sizes[key]) / self.anchor_rest[key] if context and self.anchor_rest[key] else 0.0
            for n in change:
                outputs[n] += change[n]
                if weight and reach:
                    outputs[n] += (weight * reach) * (context[n] - change[n])
        return _drift(self.budget, M.compare_outputs(self.original, outputs))


def _anchor(pipeline, live: list[SitePlan], predictor: Superposition, run) -> None:
    """Each candidate everywhere it applies, then less one site at a time: every option's change in the
    context of its candidate's other sites, for the interaction term."""
    anchors = {}
    for p in live:
        for i, option in enumerate(p.options[1:], 1):
            anchors.setdefault(option.candidate, {})[p.site.id] = i
    anchors = [a for a in anchors.values() if len(a) > 1]
    runs = sum(len(a) + 1 for a in anchors) * len(pipeline.batches)
    with pipeline.progress.task("auto: in-context drift (each candidate everywhere, less one site)", runs) as tick:
        for selection in anchors:
            outputs = run(selection, tick)
            without = {site_id: run({**selection, site_id: 0}, tick) for site_id in selection}
            predictor.add_anchor(selection, outputs, without)


def _replay(sites, plan_in: dict):
    """Sites and candidates of a written plan; a site it does not name keeps its attention."""
    wanted = plan_in.get("sites", {})
    unknown = sorted(set(wanted) - {s.id for s in sites})
    if unknown:
        raise InputError(f"--plan-in names sites this model does not have: {', '.join(unknown)}.")
    texts = sorted({t for t in wanted.values() if t != "original"})
    return [s for s in sites if s.id in wanted], [parse_pass(t) for t in texts]


def _add_candidate(pipeline, model, spec: PassSpec, index: int, plans: dict[str, SitePlan], plan_in) -> None:
    """Plan, fit and write `spec` beside the original at every site it applies to."""
    from attnrewrite.validate.pipeline import plan_site, write_beside

    planned = []
    for site_id, p in plans.items():
        if plan_in is not None and plan_in["sites"].get(site_id) != spec.text:
            continue
        decision = plan_site(spec, p.site)
        if isinstance(decision, str):
            p.skipped[spec.label()] = decision
        elif decision.needs_calibration and not pipeline.calibrated:
            p.skipped[spec.label()] = "fits on real inputs; give --calib"
        else:
            planned.append((p.site, decision))
    if not planned:
        return
    fitted, declined = pipeline._fit(model, spec, planned)
    for site_id, reason in declined:
        plans[site_id].skipped[spec.label()] = reason
    for r in write_beside(model, spec, fitted, tag=f"auto{index}"):
        plans[r.site.id].options.append(Option(spec, index, r.value, r.plan))


def _shapes(pipeline, model, sites) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per site, on one calibration sample (what the sites are timed at): the shapes of Q/K/V/bias
    (what a rewrite reads) and of the inputs of the site's own nodes (`lone.exported_name`)."""
    values = lone.site_activations(model, pipeline.base_dir, sites, pipeline.batches[0], exported=True)
    out = {}
    for s in sites:
        roles = {"q": s.q, "k": s.k, "v": s.v, **({"bias": s.bias} if s.bias is not None else {})}
        out[s.id] = {role: tuple(values[v.name].shape) for role, v in roles.items()}
        out[s.id].update({lone.exported_name(v): tuple(values[v.name].shape) for v in lone.exported_inputs(s)})
    return out


#: the original site as the exporter wrote it (`lone.as_exported`); older cache entries timed a canonical one
ORIGINAL_KEY = "original as exported"


def _time(model: ir.Model, live: list[SitePlan], shapes, model_path: Path) -> None:
    """Median ms of every option at every site, each site's options timed side by side alone (the
    original as the model has it); shared by sites with equal shapes and semantics and cached per
    model and shape."""
    cache_path = _cache_path()
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()[:16]
    groups: dict[str, dict[str, onnx.ModelProto]] = {}
    feeds_for: dict[str, dict[str, np.ndarray]] = {}
    keys = {}
    for p in live:
        shape = shapes[p.site.id]
        roles = {k: v for k, v in shape.items() if k in ("q", "k", "v", "bias")}
        exported = lone.exported_inputs(p.site)
        # by shapes, not names: the sites of a stack share one timing
        semantics = json.dumps([roles, [(shape[lone.exported_name(v)], str(v.dtype)) for v in exported],
                                p.site.info.grid, p.site.info.prefix_tokens, p.site.info.suffix_tokens,
                                p.site.info.bias_kind, [n.op_type for n in p.site.nodes]], default=str)
        for option in p.options:
            key = f"{digest}|{semantics}|{option.spec.text if option.spec else ORIGINAL_KEY}"
            keys[id(option)] = key
            if key in cache or key in groups.get(semantics, {}):
                continue
            if option.spec:
                proto = lone.rewritten(model, option.spec, p.site, option.plan, roles)
            elif lone.exports_alone(p.site):
                proto = lone.as_exported(model, p.site, shape)
            else:
                proto = lone.original(model, p.site, roles)
            groups.setdefault(semantics, {})[key] = proto
            if semantics not in feeds_for:  # one set of timing inputs per group, not per option
                dtypes = {lone.exported_name(v): v.dtype.numpy() for v in exported if v.dtype}
                feeds_for[semantics] = lone.random_feeds(shape, dtypes=dtypes)
    for semantics, group in groups.items():
        results = B.bench_models(list(group.values()), feeds_for[semantics], warmup=1, repeats=5)
        for key, result in zip(group, results):
            cache[key] = result.median_ms
    if groups:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        from attnrewrite.validate.report import atomic_write

        atomic_write(cache_path, json.dumps(cache, indent=1))
    for p in live:
        for option in p.options:
            option.ms = float(cache[keys[id(option)]])


def _cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "attnrewrite" / "site_costs.json"


def _local_drift(pipeline, model, live: list[SitePlan]) -> None:
    """Each option's own output against the site's original, on identical inputs (one run)."""
    names = list(dict.fromkeys([p.site.output.name for p in live] + [o.value.name for p in live for o in p.options[1:]]))
    values = run_batches(make_session(model, pipeline.base_dir, names), pipeline.batches, names)
    for p in live:
        for option in p.options[1:]:
            option.local = M.site_metrics(values[p.site.output.name], values[option.value.name])


def _drift(budget, metrics: dict) -> float:
    """Distance of the budget metric from perfect on the budget's worst output."""
    score = S.budget_score([budget], metrics)
    value = -score if budget.op in (">=", ">") else score
    return abs(value - PERFECT[budget.metric])


#: a candidate must be at least this much faster than the site's original to be worth any drift
MIN_GAIN = 0.95


def _worth(p: SitePlan, i: int) -> bool:
    """May option `i` be chosen at all: the original, or a candidate that beats it by the margin
    (timing noise buys no drift)."""
    return i == 0 or p.options[i].ms < MIN_GAIN * p.options[0].ms


def _fastest(p: SitePlan) -> int:
    """The fastest option worth choosing."""
    worth = [i for i in range(len(p.options)) if _worth(p, i)]
    return min(worth, key=lambda i: (p.options[i].ms, p.options[i].drift))


#: budget caps tried for the knapsack, as multiples of the allowed drift: leave-one-in drifts do not add
#: exactly (changes that line up add more, orthogonal ones about add, opposite ones cancel), so the
#: superposition predictor judges each cap's plan and the fastest plan it passes wins
CAPS = (2.0, 1.5, 1.25, 1.0, 0.8, 0.6, 0.4, 0.2)
#: drift resolution of the knapsack: the cap in this many units, every option's drift rounded up to one
UNITS = 2000


def _search(live: list[SitePlan], predictor, allowed: float) -> tuple[int, int]:
    """The fastest plan the prediction keeps within budget; returns (plans tried + greedy steps,
    relaxations).

    Per site the choice trades ms against drift, and the sites share one drift budget: a
    multiple-choice knapsack, solved exactly (`_knapsack`) on the leave-one-in drifts at each cap in
    `CAPS`. Greedy stepping from the fastest option everywhere cannot find plans that give a site a
    slower but more accurate option to afford a variant somewhere else (on the digits ViT at 1025
    tokens, summing drifts, it kept attn_1 on softmax where `neighborhood:kernel=17` there, paid for by
    8×8 instead of 4×4 windows on attn_2-3, was faster), but it is still tried, and so is every
    candidate alone as `--fallback` would keep it (`_single_candidate_plans`), so by the prediction
    auto's plan is never slower than a single pass's: the fastest of all these plans that the predictor
    passes is taken (all-original always passes), and single faster moves that still fit (`_relax`)
    finish it."""
    plans = [_knapsack(live, factor * allowed) for factor in CAPS] + _single_candidate_plans(live, predictor, allowed)
    steps = len(plans)
    for p in live:
        p.choice = _fastest(p)
    while predictor.drift(live) > allowed and _step(live):
        steps += 1
    plans.append([p.choice for p in live])
    best, best_ms = [0] * len(live), np.inf
    for selection in plans:
        _apply(live, selection)
        ms = sum(p.options[p.choice].ms for p in live)
        if ms < best_ms and predictor.drift(live) <= allowed:
            best, best_ms = selection, ms
    _apply(live, best)
    relaxed = 0
    while _relax(live, predictor, allowed):
        relaxed += 1
    return steps, relaxed


def _single_candidate_plans(live: list[SitePlan], predictor, allowed: float) -> list[list[int]]:
    """Each candidate alone, the way `--fallback` keeps a pass: on every site where it is worth its
    drift, the most sensitive sites back to the original until the prediction fits, then each reverted
    site tried again, least sensitive first."""
    plans = []
    for candidate in sorted({o.candidate for p in live for o in p.options[1:]}):
        for p in live:
            p.choice = next((i for i, o in enumerate(p.options)
                             if i and o.candidate == candidate and _worth(p, i)), 0)
        reverted = []
        for p in sorted((p for p in live if p.choice), key=lambda p: -p.options[p.choice].drift):
            if predictor.drift(live) <= allowed:
                break
            reverted.append((p, p.choice))
            p.choice = 0
        for p, choice in reversed(reverted):
            p.choice = choice
            if predictor.drift(live) > allowed:
                p.choice = 0
        plans.append([p.choice for p in live])
    return plans


def _apply(live: list[SitePlan], selection: list[int]) -> None:
    for p, choice in zip(live, selection):
        p.choice = choice


def _knapsack(live: list[SitePlan], cap: float) -> list[int]:
    """Per site the option minimising the plan's total ms with the sum of leave-one-in drifts ≤ `cap`
    (exact dynamic programme over `UNITS` drift units, drifts rounded up so the sum never exceeds the
    cap); only options worth their drift (`MIN_GAIN`) and the original take part."""
    unit = cap / UNITS if cap > 0 else None
    least = np.zeros(UNITS + 1)  # least[c]: fewest ms of the sites so far within c units
    picks, weights = [], []
    for p in live:
        w = {i: _units(o.drift, unit) for i, o in enumerate(p.options) if _worth(p, i)}
        row, pick = np.full(UNITS + 1, np.inf), np.zeros(UNITS + 1, dtype=int)
        for i, units in w.items():
            if units > UNITS:
                continue
            total = np.full(UNITS + 1, np.inf)
            total[units:] = least[:UNITS + 1 - units] + p.options[i].ms
            better = total < row
            row[better], pick[better] = total[better], i
        least = row
        picks.append(pick)
        weights.append(w)
    selection, c = [], UNITS
    for pick, w in zip(reversed(picks), reversed(weights)):
        choice = int(pick[c])
        selection.append(choice)
        c -= w[choice]
    return selection[::-1]


def _units(drift: float, unit: float | None) -> int:
    """Drift in knapsack units, rounded up; more than the knapsack holds when it cannot be afforded
    (no cap, or a drift that is not a number: a candidate whose outputs went NaN is never chosen)."""
    if drift <= 0:
        return 0
    if unit is None or not np.isfinite(drift):
        return UNITS + 1
    return int(min(np.ceil(drift / unit - 1e-9), UNITS + 1))


def _relax(live: list[SitePlan], predictor, allowed: float) -> bool:
    """Move the one site whose switch to a faster option saves the most ms per unit of predicted drift
    while the whole plan stays within the budget; False when no faster option fits."""
    before = predictor.drift(live)

    def gain(p: SitePlan, i: int) -> float | None:
        current, keep = p.options[p.choice], p.choice
        if p.options[i].ms >= current.ms:
            return None
        p.choice = i
        after = predictor.drift(live)
        p.choice = keep
        return (current.ms - p.options[i].ms) / max(after - before, 1e-9) if after <= allowed else None

    return _take_best_move(live, gain)


def _step(live: list[SitePlan]) -> bool:
    """Move the one site whose switch to a more accurate option buys the most drift per ms."""

    def gain(p: SitePlan, i: int) -> float | None:
        current, option = p.options[p.choice], p.options[i]
        if option.drift >= current.drift:
            return None
        return (current.drift - option.drift) / max(option.ms - current.ms, 1e-3)

    return _take_best_move(live, gain)


def _take_best_move(live: list[SitePlan], gain) -> bool:
    """Switch the one (site, option worth choosing) with the largest positive `gain(site, option)`
    (None: not a move); False when there is none."""
    best, best_gain = None, 0.0
    for p in live:
        for i in range(len(p.options)):
            g = gain(p, i) if _worth(p, i) else None
            if g is not None and g > best_gain:
                best, best_gain = (p, i), g
    if best is None:
        return False
    best[0].choice = best[1]
    return True


def _document(pipeline, plans: dict[str, SitePlan], start: float, *, predicted, measured, steps: int,
              repairs: int, predictor: Superposition | None, relaxed: int, limit: float | None) -> dict:
    sites, chosen, base_ms, plan_ms = [], {}, 0.0, 0.0
    for site_id, p in plans.items():
        option = p.options[p.choice]
        chosen[site_id] = option.spec.text if option.spec else "original"
        if len(p.options) > 1:
            base_ms += p.options[0].ms
            plan_ms += option.ms
        summary = {"chosen": option.label, "site ms": round(option.ms, 3), "original site ms": round(p.options[0].ms, 3)}
        summary.update({f"{o.label}: ms / leave-one-in drift": f"{o.ms:.3f} / {o.drift:.3g}" for o in p.options[1:]})
        summary.update({f"{label}: not here": why for label, why in p.skipped.items()})
        status = "rewritten" if option.spec else ("reverted" if len(p.options) > 1 else "skipped")
        if option.spec:
            reason = None
        elif len(p.options) > 1:
            reason = "kept original attention: no candidate is both faster and within the budget here"
        elif p.skipped:
            reason = "no candidate applies: " + "; ".join(f"{k}: {v}" for k, v in p.skipped.items())
        else:
            reason = "kept original attention (as the plan says)"
        sites.append({"id": site_id, "status": status, "reason": reason, "local": option.local,
                      "accumulated": None, "plan": summary, "target": None, "sensitivity": option.alone})
    return {
        "sites": sites,
        "plan": {"sites": chosen},
        "auto": {"predicted_drift": predicted, "measured_drift": measured, "planned_within": limit,
                 "predictor": predictor.kind if predictor else None,
                 "interaction_weight": predictor.weight if predictor else None, "search_steps": steps, "relax_steps": relaxed,
                 "repair_steps": repairs,
                 "metric": pipeline.budgets[0].metric, "site_ms_original": round(base_ms, 3),
                 "site_ms_plan": round(plan_ms, 3), "site_speedup": round(base_ms / plan_ms, 3) if plan_ms else None,
                 "seconds": round(time.perf_counter() - start, 2)},
    }
