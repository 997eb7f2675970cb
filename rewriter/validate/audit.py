"""`audit BEFORE AFTER`: how far apart two models with the same inputs are, overall and per site.

Sites are paired by provenance when AFTER was written by attnrewrite (each new attention output
records the original value it replaced), else by position when both models have the same number of
detected sites, else only model-level metrics are reported.
"""

from __future__ import annotations

import onnx

from attnrewrite.validate import metrics as M
from attnrewrite.onnx.analysis import analyze
from attnrewrite.errors import InputError
from attnrewrite.onnx.modelio import load_model
from attnrewrite.validate.pipeline import ORIGINAL_OUTPUT_TAG
from attnrewrite.progress import Progress
from attnrewrite.validate.report import clean, sha256_of
from attnrewrite.validate.runner import run_batches, session_from_path


def pair_sites(before: str, after: str) -> tuple[str, list[tuple[str, str, str]]]:
    """[(site id, value in BEFORE, value in AFTER)] and how they were paired."""
    before_values = _node_outputs(before)
    after_model = load_model(after)
    tagged = [
        (v.metadata_props[ORIGINAL_OUTPUT_TAG], v.name)
        for node in after_model.graph for v in node.outputs
        if ORIGINAL_OUTPUT_TAG in v.metadata_props
    ]
    pairs = [(orig, new) for orig, new in tagged if orig in before_values]
    if pairs:
        return "provenance", [(f"attn_{i}", b, a) for i, (b, a) in enumerate(pairs)]
    sites_b = analyze(before).sites
    sites_a = analyze(after).sites
    if sites_b and len(sites_b) == len(sites_a):
        return "position", [(sb.id, sb.output.name, sa.output.name) for sb, sa in zip(sites_b, sites_a)]
    return "none", []


def _node_outputs(path: str) -> set[str]:
    proto = onnx.load(path, load_external_data=False)
    return {o for n in proto.graph.node for o in n.output}


def audit(before: str, after: str, calibration, budgets, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    load_model(before)
    load_model(after)
    in_b = [i.name for i in onnx.load(before, load_external_data=False).graph.input]
    proto_a = onnx.load(after, load_external_data=False)
    in_a = [i.name for i in proto_a.graph.input]
    init_a = {t.name for t in proto_a.graph.initializer}
    if [n for n in in_b] != [n for n in in_a if n not in init_a] and set(in_b) != set(in_a):
        raise InputError(f"{after} has inputs {in_a} but {before} has {in_b}; audit compares models with the same inputs.")
    pairing, pairs = pair_sites(before, after)
    sess_b = session_from_path(before, [b for _, b, _ in pairs])
    sess_a = session_from_path(after, [a for _, _, a in pairs])
    outputs = [o.name for o in onnx.load(before, load_external_data=False).graph.output]
    missing = [o for o in outputs if o not in {x.name for x in sess_a.get_outputs()}]
    if missing:
        raise InputError(f"{after} lacks the outputs {missing} of {before}.")
    batches = calibration.batches
    with progress.task("running BEFORE", len(batches)) as tick:
        ref = run_batches(sess_b, batches, outputs + [b for _, b, _ in pairs], tick)
    with progress.task("running AFTER", len(batches)) as tick:
        test = run_batches(sess_a, batches, outputs + [a for _, _, a in pairs], tick)
    model_metrics = M.compare_outputs({o: ref[o] for o in outputs}, {o: test[o] for o in outputs})
    sites = []
    for site_id, b, a in pairs:
        m = M.site_metrics(ref[b], test[a])
        sites.append({"id": site_id, "before": b, "after": a, **m})
    failures = M.check_budgets(budgets, model_metrics)
    budget_rows = []
    for budget in budgets:
        mine = [str(f) for f in failures if f.budget == budget]
        budget_rows.append({"budget": str(budget), "passed": not mine, "detail": "; ".join(mine) or None})
    return clean({
        "tool": "attnrewrite",
        "command": "audit",
        "version": __import__("attnrewrite").__version__,
        "before": {"path": before, "sha256": sha256_of(before)},
        "after": {"path": after, "sha256": sha256_of(after)},
        "calibration": {"source": calibration.source, "num_samples": calibration.num_samples},
        "model_metrics": model_metrics,
        "pairing": pairing,
        "sites": sites,
        "budgets": budget_rows,
        "status": "budget_exceeded" if failures else "ok",
    })
