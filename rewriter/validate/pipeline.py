"""The pass pipeline: detect → rewrite → check → validate, once per `--pass`, with honest numbers.

Per pass and site: `applies` decides (a reason, or a plan), `fit` fits constants on calibration
activations when the plan asks for it, `rewrite` emits, and `ensures` checks the pass's own promise
on the measured drift. Each pass first writes its new attention *beside* the original one (a probe: the new subgraph reads
the same Q/K/V, nothing consumes it). One onnxruntime run of that probe model gives each site's local
drift (new vs original attention on identical inputs) and the previous model's outputs. Then the
original outputs' uses are switched to the new ones, and a second run gives the model-level drift
and the accumulated per-site drift. `--sensitivity` (and `--fallback`) also measures each site's
leave-one-in drift (the model with only that site rewritten) on one gated session
(`sensitivity.py`); `--fallback` switches the most sensitive sites back until the budget holds, then
repairs greedily. Switching is just re-pointing uses, so no re-detection is needed. Dead-code
elimination at the end removes whichever branch lost.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from attnrewrite.errors import AttnRewriteError, InputError, PassError
from attnrewrite.layout import output_as_bhnd, to_original_layout
from attnrewrite.onnx.canonicalize import canonicalize
from attnrewrite.onnx.detect import detect
from attnrewrite.progress import Progress
from attnrewrite.registry import PassSpec, Plan, SiteDrift
from attnrewrite.select import select
from attnrewrite.site import AttentionSite
from attnrewrite.validate import metrics as M
from attnrewrite.validate import sensitivity as S
from attnrewrite.validate.runner import make_session, run_batches, session_from_path
from attnrewrite.validate.signature import IOSignature

if TYPE_CHECKING:
    from attnrewrite.validate.auto import AutoOptions

SITE_TAG = "attnrewrite.site"
PASS_TAG = "attnrewrite.pass"
ORIGINAL_OUTPUT_TAG = "attnrewrite.original_output"


@dataclasses.dataclass
class Rewrite:
    site: AttentionSite
    plan: Plan
    value: ir.Value  # the new attention output, in the original layout
    #: `--target tensorrt`: the plugin node that carries this site, or why it stayed plain ONNX
    target: str | None = None

    @property
    def probe_name(self) -> str:
        return self.value.name


@dataclasses.dataclass
class SiteOutcome:
    id: str
    status: str  # rewritten | skipped | reverted | unselected
    reason: str | None = None
    local: dict[str, float] | None = None
    accumulated: dict[str, float] | None = None
    #: what the pass decided or fitted here (`Plan.summary`): per-head orders, densities, scales
    plan: dict[str, Any] | None = None
    #: `--target tensorrt` only: "WindowAttention plugin", or "plain ONNX: <why no kernel runs it>"
    target: str | None = None
    #: leave-one-in: the model's drift (worst output) with only this site rewritten (`--sensitivity`,
    #: `--fallback`); what the fallback orders sites by
    sensitivity: dict[str, float] | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Rewriting


def write_beside(model: ir.Model, spec: PassSpec, planned: list[tuple[AttentionSite, Plan]],
                 target: str = "onnxruntime", tag: str | None = None) -> list[Rewrite]:
    """Emit each site's rewrite as an unused branch (the probe); returns the new outputs.

    With `target="tensorrt"` a site a fused kernel can run becomes one plugin node whose local
    function is the same rewrite (`plugins/onnx_nodes.py`), so the probe measures the same math.
    `tag` names the outputs when several candidates of one pass sit beside the same site (`auto`)."""
    graph = model.graph
    rewrites = []
    for site, plan in planned:
        before = len(graph)
        attention, note = _emit(model, spec, site, plan, target)
        new = to_original_layout(graph, site.output_layout, attention, site.output)
        new.name = f"attnrewrite/{site.id}/{tag or spec.name}_output"
        new.metadata_props[ORIGINAL_OUTPUT_TAG] = site.output.metadata_props.get(ORIGINAL_OUTPUT_TAG, site.output.name)
        new.metadata_props[SITE_TAG] = site.id
        for count, node in enumerate(list(graph)[before:]):
            node.metadata_props[PASS_TAG] = spec.label()
            node.metadata_props[SITE_TAG] = site.id
            # onnx_ir names every node it adds (`node_Add_3`); provenance is worth more to a reader
            node.name = f"attnrewrite/{site.id}/{spec.label()}/{node.op_type}_{count}"
        if site.output.type is not None:
            new.type = site.output.type
        rewrites.append(Rewrite(site=site, plan=plan, value=new, target=note))
    _add_opset_imports(model)
    common_passes.TopologicalSortPass()(model)
    return rewrites


def _emit(model: ir.Model, spec: PassSpec, site: AttentionSite, plan: Plan, target: str) -> tuple[ir.Value, str | None]:
    """The site's new attention `[B, h, N, dv]`, and for TensorRT what carries it."""
    if target != "tensorrt":
        return spec.impl.rewrite(model.graph, site, plan), None
    from attnrewrite.plugins import onnx_nodes

    call = onnx_nodes.plugin_call(spec.name, site, plan)
    if isinstance(call, str):
        return spec.impl.rewrite(model.graph, site, plan), f"plain ONNX: {call}"
    return onnx_nodes.emit_plugin(model, site, plan, call, spec.impl.rewrite), onnx_nodes.plugin_note(call)


def switch(rewrite: Rewrite, *, on: bool) -> None:
    """Point the model's consumers at the new attention (on) or back at the original (off)."""
    if on:
        rewrite.site.output.replace_all_uses_with(rewrite.value)
    else:
        rewrite.value.replace_all_uses_with(rewrite.site.output)


def _add_opset_imports(model: ir.Model) -> None:
    for node in model.graph:
        if node.domain and node.domain not in model.opset_imports:
            model.opset_imports[node.domain] = 1


def finalize(model: ir.Model) -> None:
    """Drop the losing branches and detection helpers; keep the graph sorted."""
    common_passes.RemoveUnusedNodesPass()(model)
    _drop_unused_plugin_bodies(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    common_passes.TopologicalSortPass()(model)


def _drop_unused_plugin_bodies(model: ir.Model) -> None:
    """Bodies of plugin nodes that lost to the original (`--fallback`); the model's own functions stay."""
    from attnrewrite.plugins.onnx_nodes import unused_functions

    for key in unused_functions(model):
        del model.functions[key]


def check_model(model: ir.Model, base_dir: Path, done: list[str]) -> None:
    """onnx.checker and shape inference must accept every model we produce."""
    proto = ir.to_proto(model)
    try:
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            # the checker resolves external data relative to the model file: check a copy beside it
            fd, tmp = tempfile.mkstemp(prefix=".attnrewrite-check-", suffix=".onnx", dir=base_dir)
            os.close(fd)
            try:
                onnx.save(proto, tmp)
                onnx.checker.check_model(tmp)
            finally:
                os.unlink(tmp)
        else:
            onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except Exception as exc:  # noqa: BLE001
        raise PassError(f"after {' → '.join(done)}: the model fails the ONNX checker: {str(exc).splitlines()[0][:300]}") from exc


# ---------------------------------------------------------------------------------------------
# Validation


@dataclasses.dataclass
class PassReport:
    spec: PassSpec
    seconds: float = 0.0
    sites: list[SiteOutcome] = dataclasses.field(default_factory=list)
    vs_original: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    vs_previous: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    budget_failures: list[str] = dataclasses.field(default_factory=list)
    #: `attention_maps.AttentionMap`s for the HTML report (not part of the JSON document)
    maps: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "pass": self.spec.name,
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.spec.options.items()},
            "label": self.spec.label(),
            "exact": self.spec.impl.exact,
            "seconds": round(self.seconds, 3),
            "rewritten": [s.id for s in self.sites if s.status == "rewritten"],
            "kept_original": [s.id for s in self.sites if s.status == "reverted"],
            "sites": [s.to_json() for s in self.sites],
            "metrics_vs_original": self.vs_original,
            "metrics_vs_previous": self.vs_previous,
            "budget_failures": self.budget_failures,
        }


@dataclasses.dataclass
class Pipeline:
    """Applies passes to one model, validating each against the original file's own outputs."""

    path: Path
    batches: list[dict[str, np.ndarray]]
    budgets: list[Any] = dataclasses.field(default_factory=list)
    selectors: tuple[str, ...] = ()
    fallback: bool = False
    #: calibration batches whose activations passes may fit on (memory grows with sites × batches)
    fit_batches: int = 8
    #: False when the batches are seeded random inputs: passes whose fit needs real data refuse them
    calibrated: bool = True
    #: "tensorrt": sites a fused kernel runs become plugin nodes with their ONNX body as a local function
    target: str = "onnxruntime"
    #: measure each site's leave-one-in model drift (always on with `fallback` in sensitivity order)
    sensitivity: bool = False
    #: what `--fallback` reverts first: "sensitivity" (leave-one-in drift) or "local" (the site's own
    #: drift: no extra runs, but a poor guide on real models)
    fallback_order: str = "sensitivity"
    #: draw attention maps before/after for a few sites and queries (the HTML report)
    attention_maps: bool = False
    progress: Progress = dataclasses.field(default_factory=Progress)

    def __post_init__(self) -> None:
        self.base_dir = self.path.resolve().parent
        original = session_from_path(self.path)
        self.output_names = [o.name for o in original.get_outputs()]
        with self.progress.task("running the original model", len(self.batches)) as tick:
            self.original_outputs = run_batches(original, self.batches, self.output_names, tick)

    def run_auto(self, model: ir.Model, options: AutoOptions, plan_in: dict | None = None) -> dict:
        """`--pass auto`: choose a candidate per site (`auto.py`), apply it, validate the model; the
        pass's JSON (shaped like `PassReport.to_json`) with the plan and its predicted/measured drift."""
        from attnrewrite.validate import auto

        signature = IOSignature.of(model)
        start = time.perf_counter()
        doc = auto.plan_auto(self, model, options, plan_in)
        finalize(model)
        signature.restore(model)
        check_model(model, self.base_dir, ["auto"])
        session = make_session(model, self.base_dir)
        with self.progress.task("auto: model drift", len(self.batches)) as tick:
            current = run_batches(session, self.batches, self.output_names, tick)
        vs_original = M.compare_outputs(self.original_outputs, current)
        return {"pass": "auto", "params": options.params, "label": "auto",
                "exact": False, "seconds": round(time.perf_counter() - start, 3),
                "rewritten": [s["id"] for s in doc["sites"] if s["status"] == "rewritten"],
                "kept_original": [s["id"] for s in doc["sites"] if s["status"] == "reverted"],
                "sites": doc["sites"], "metrics_vs_original": vs_original, "metrics_vs_previous": vs_original,
                "budget_failures": self._budget_failures(current), "plan": doc["plan"], "auto": doc["auto"]}

    def run(self, model: ir.Model, specs: list[PassSpec]) -> list[PassReport]:
        """Apply every pass in order; the model keeps the input's I/O signature exactly."""
        signature = IOSignature.of(model)
        reports, done = [], []
        for spec in specs:
            reports.append(self.apply(model, spec, done))
            done.append(spec.label())
        signature.restore(model)
        return reports

    def apply(self, model: ir.Model, spec: PassSpec, done: list[str]) -> PassReport:
        start = time.perf_counter()
        report = PassReport(spec=spec)
        canonicalize(model)
        sites = self._check_bias_rows(model, detect(model).sites)
        chosen = select(sites, self.selectors) if self.selectors else list(sites)
        chosen_ids = {s.id for s in chosen}
        planned: list[tuple[AttentionSite, Plan]] = []
        for site in sites:
            if site.id not in chosen_ids:
                report.sites.append(SiteOutcome(site.id, "unselected", "not selected by --sites"))
                continue
            decision = plan_site(spec, site)
            if isinstance(decision, str):
                report.sites.append(SiteOutcome(site.id, "skipped", decision))
            else:
                planned.append((site, decision))
        planned, declined = self._fit(model, spec, planned)
        report.sites.extend(SiteOutcome(site_id, "skipped", reason) for site_id, reason in declined)
        try:
            rewrites = write_beside(model, spec, planned, self.target)
        except AttnRewriteError:
            raise
        except Exception as exc:  # noqa: BLE001 - a pass bug must name the pass
            raise PassError(f"pass {spec.label()} failed while rewriting (after {' → '.join(done) or 'no passes'}): {exc}") from exc
        outcomes = {r.site.id: SiteOutcome(r.site.id, "rewritten", plan=r.plan.summary() or None, target=r.target)
                    for r in rewrites}

        # 1) probe: new attention beside the old one, identical inputs → local drift + previous outputs
        site_names = [r.site.output.name for r in rewrites] + [r.probe_name for r in rewrites]
        probe = make_session(model, self.base_dir, site_names)
        with self.progress.task(f"{spec.label()}: local drift", len(self.batches)) as tick:
            probe_out = run_batches(probe, self.batches, self.output_names + site_names, tick)
        previous = {n: probe_out[n] for n in self.output_names}
        for r in rewrites:
            outcomes[r.site.id].local = M.site_metrics(probe_out[r.site.output.name], probe_out[r.probe_name])
            try:
                spec.impl.ensures(SiteDrift(site=r.site, plan=r.plan, metrics=outcomes[r.site.id].local))
            except PassError as exc:
                raise type(exc)(f"{exc} (passes before it: {' → '.join(done) or 'none'})") from exc

        # 2) switch the sites on (every one, or those the fallback search keeps), check validity,
        #    measure model-level drift
        if rewrites and (self.sensitivity or self.fallback):
            self._search(model, rewrites, outcomes, spec)
        else:
            for r in rewrites:
                switch(r, on=True)
        current = self._run_current(model, rewrites, spec, done)
        report.budget_failures = self._budget_failures(current)
        for r in rewrites:
            if outcomes[r.site.id].status == "rewritten":
                outcomes[r.site.id].accumulated = M.site_metrics(probe_out[r.site.output.name], current[r.probe_name])
        if self.attention_maps and rewrites:
            report.maps = self._maps(model, spec, rewrites, outcomes)
        report.sites.extend(outcomes.values())
        report.sites.sort(key=lambda s: _site_index(s.id))
        report.vs_original = M.compare_outputs(self.original_outputs, {n: current[n] for n in self.output_names})
        report.vs_previous = M.compare_outputs(previous, {n: current[n] for n in self.output_names})
        finalize(model)
        check_model(model, self.base_dir, [*done, spec.label()])
        report.seconds = time.perf_counter() - start
        return report

    def _fit(self, model: ir.Model, spec: PassSpec, planned: list[tuple[AttentionSite, Plan]]
             ) -> tuple[list[tuple[AttentionSite, Plan]], list[tuple[str, str]]]:
        """Let a pass fit per-site constants on the sites' calibration activations (first batches).

        Returns the fitted plans and the sites whose fit declined (a fit that diverged keeps the
        site's original attention, with the reason, rather than writing NaN constants)."""
        sites = [site for site, plan in planned if plan.needs_fit]
        if not sites:
            return planned, []
        if not self.batches:
            raise InputError(f"pass {spec.label()} fits on calibration data, and there is none.")
        if not self.calibrated and any(plan.needs_calibration for _, plan in planned):
            raise InputError(f"pass {spec.label()} fits static tables on calibration activations: give real inputs "
                             "with --calib (seeded random inputs would fit noise).")
        names: dict[str, dict[str, str]] = {}
        for site in sites:
            names[site.id] = {"q": site.q.name, "k": site.k.name, "v": site.v.name, "output": site.output.name}
            if site.bias is not None:
                names[site.id]["bias"] = site.bias.name
        wanted = list(dict.fromkeys(n for per in names.values() for n in per.values()))
        session = make_session(model, self.base_dir, wanted)
        batches = self.batches[: self.fit_batches]
        with self.progress.task(f"{spec.label()}: calibration activations", len(batches)) as tick:
            values = run_batches(session, batches, wanted, tick)
        fitted, declined = [], []
        for site, plan in planned:
            if plan.needs_fit:
                acts = {role: values[name] for role, name in names[site.id].items()}
                for role in ("q", "k", "v"):
                    if not np.isfinite(acts[role]).all():
                        raise InputError(f"site {site.id}: its calibration {role.upper()} activations contain NaN or "
                                         f"inf, so pass {spec.label()} cannot fit on them; check the --calib inputs.")
                acts["output"] = output_as_bhnd(site.output_layout, site.num_heads, acts["output"])
                plan = spec.impl.fit(site, acts, plan)
                if isinstance(plan, str):
                    declined.append((site.id, plan))
                    continue
            fitted.append((site, plan))
        return fitted, declined

    def _check_bias_rows(self, model: ir.Model, sites: list[AttentionSite]) -> list[AttentionSite]:
        """Mark input-dependent biases whose rows are identical on real inputs as per-key.

        Exporters build padding masks with index arithmetic (`q_idx >= 0 & mask[k_idx]`) that is
        query-invariant in value but not in structure; the calibration run settles it.
        """
        pending = [s for s in sites if s.bias is not None and not s.bias_per_key and s.bias.name]
        if not pending or not self.batches:
            return sites
        names = list(dict.fromkeys(s.bias.name for s in pending))
        session = make_session(model, self.base_dir, names)
        values = run_batches(session, self.batches[:1], names)
        per_key = set()
        for site in pending:
            arr = values[site.bias.name]
            if arr.ndim >= 2 and np.array_equal(arr, np.broadcast_to(arr[..., :1, :], arr.shape)):
                per_key.add(site.id)
        note = "bias is the same for every query on the calibration inputs"
        return [s.with_info(bias_per_key=True, notes=(*s.notes, note)) if s.id in per_key else s for s in sites]

    def _run_current(self, model, rewrites, spec, done) -> dict[str, np.ndarray]:
        names = [r.probe_name for r in rewrites]
        try:
            session = make_session(model, self.base_dir, names)
        except AttnRewriteError as exc:
            raise PassError(f"after {' → '.join([*done, spec.label()])}: {exc}") from exc
        with self.progress.task(f"{spec.label()}: model drift", len(self.batches)) as tick:
            return run_batches(session, self.batches, self.output_names + names, tick)

    def _budget_failures(self, outputs: dict[str, np.ndarray]) -> list[str]:
        if not self.budgets:
            return []
        metrics = M.compare_outputs(self.original_outputs, {n: outputs[n] for n in self.output_names})
        return [str(f) for f in M.check_budgets(self.budgets, metrics)]

    def _search(self, model: ir.Model, rewrites: list[Rewrite], outcomes: dict[str, SiteOutcome], spec: PassSpec) -> None:
        """Leave-one-in sensitivity per site, then (`--fallback`) the sites to keep, on one gated session.

        The fallback reverts the most sensitive sites (leave-one-in drift on the first budget's metric)
        one at a time until the budget holds, then tries each reverted site again, least sensitive
        first, keeping it when the budget still holds: drift is not additive across sites."""
        gated = S.gate_rewrites(model, rewrites, self.base_dir)
        ids = [r.site.id for r in rewrites]
        scores = {i: (outcomes[i].local or {}).get("rel_l2", 0.0) for i in ids}
        if self.sensitivity or self.fallback_order == "sensitivity":
            with self.progress.task(f"{spec.label()}: leave-one-in sensitivity", len(ids) * len(self.batches)) as tick:
                for site_id in ids:
                    metrics = S.compare(self.original_outputs, gated.run({site_id}, self.batches, self.output_names, tick),
                                        self.output_names)
                    outcomes[site_id].sensitivity = S.summary(metrics)
                    if self.budgets and self.fallback_order == "sensitivity":
                        scores[site_id] = S.budget_score(self.budgets, metrics)
        on = set(ids)
        if self.fallback and self.budgets:
            def holds(selection: set[str]) -> bool:
                return not self._budget_failures(gated.run(selection, self.batches, self.output_names))

            with self.progress.task(f"{spec.label()}: fallback search", 2 * len(ids) + 1) as tick:
                on = S.keep_within_budget(ids, scores, holds, tick)
            for site_id in set(ids) - on:
                outcomes[site_id].status = "reverted"
                outcomes[site_id].reason = "kept original attention by --fallback " + (
                    f"(rewritten alone, the model's {self.budgets[0].metric} moves to "
                    f"{_score_text(self.budgets[0], scores[site_id])})" if self.fallback_order == "sensitivity" else
                    f"(local rel_l2 {scores[site_id]:.4g}, --fallback-order local)")
        gated.close(on)


    def _maps(self, model, spec, rewrites, outcomes) -> list:
        """Attention maps of the rewritten sites that moved the model most (leave-one-in when measured,
        else local drift), on the first calibration sample."""
        from attnrewrite.validate import attention_maps

        kept = [r for r in rewrites if outcomes[r.site.id].status == "rewritten"]

        def drift(r):
            o = outcomes[r.site.id]
            return (o.sensitivity or o.local or {}).get("cosine", 1.0)

        order = [r.site.id for r in sorted(kept, key=drift)]
        with self.progress.task(f"{spec.label()}: attention maps", 1) as tick:
            maps = attention_maps.collect(model, self.base_dir, spec, kept, self.batches[0], order)
            tick()
        return maps


def _score_text(budget, score: float) -> str:
    value = -score if budget.op in (">=", ">") else score
    return f"{value:.6g}"


def apply_unvalidated(model: ir.Model, spec: PassSpec, selectors: tuple[str, ...] = ()) -> list[str]:
    """Rewrite every applicable site without calibration runs; returns the rewritten site ids.

    For benchmarks and scripted experiments on models too large to validate each time; the CLI
    always validates.
    """
    signature = IOSignature.of(model)
    canonicalize(model)
    detection = detect(model)
    chosen = select(detection.sites, selectors) if selectors else detection.sites
    planned = [(s, p) for s in chosen if not isinstance(p := plan_site(spec, s), str)]
    if any(plan.needs_fit for _, plan in planned):
        raise InputError(f"pass {spec.label()} fits on calibration data; run it through the validated pipeline.")
    rewrites = write_beside(model, spec, planned)
    for r in rewrites:
        switch(r, on=True)
    finalize(model)
    signature.restore(model)
    return [r.site.id for r in rewrites]


def plan_site(spec: PassSpec, site: AttentionSite) -> str | Plan:
    """Why the pass does not apply at `site`, or its plan there."""
    if not site.verified:
        return "not verified numerically"
    if site.output.is_graph_output():
        return "the attention output is itself a model output"
    return spec.applies(site)


def _site_index(site_id: str) -> int:
    tail = site_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


__all__ = ["Pipeline", "PassReport", "apply_unvalidated", "finalize"]
