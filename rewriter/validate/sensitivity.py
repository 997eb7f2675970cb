"""Leave-one-in sensitivity and the `--fallback` search, on one gated onnxruntime session.

A site's local drift (its own output, same inputs) is a poor guide to what rewriting it does to the
model: on a real DINOv2 it ranks sites with Spearman 0.59 against the measured effect. What users
decide with is the model-level drift when *only that site* is rewritten. Measuring it naively takes
one session per site and per fallback step; instead every rewritten site's consumers read

    Where(gate_i, new attention, original attention)        gate_i: a boolean graph input

so one session runs any subset of rewrites switched on, by feeding gates. `GatedModel.close` then
points each site at the branch chosen and removes the gates, leaving the model as `switch` would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from attnrewrite.validate import metrics as M
from attnrewrite.validate.runner import make_session, run_batches

GATE_PREFIX = "attnrewrite/gate/"


@dataclasses.dataclass
class GatedModel:
    model: ir.Model
    rewrites: list  # pipeline.Rewrite
    gates: list[ir.Value]
    selected: list[ir.Value]
    session: object = None

    def run(self, on: set[str], batches: list[dict[str, np.ndarray]], names: list[str],
            tick: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
        """The model with exactly the sites `on` rewritten (ids), on every batch."""
        flags = {g.name: np.array(r.site.id in on) for g, r in zip(self.gates, self.rewrites)}
        return run_batches(self.session, [{**b, **flags} for b in batches], names, tick)

    def close(self, on: set[str]) -> None:
        """Consumers read the new attention at the sites `on`, the original elsewhere; gates removed."""
        graph = self.model.graph
        for gate, selected, r in zip(self.gates, self.selected, self.rewrites):
            selected.replace_all_uses_with(r.value if r.site.id in on else r.site.output, replace_graph_outputs=True)
            graph.remove(selected.producer(), safe=True)
            graph.inputs.remove(gate)
        self.session = None


def gate(model: ir.Model, rewrites: Sequence, base_dir: Path | None) -> GatedModel:
    """Put a gate in front of every site's consumers (all sites must be switched off, as after the
    probe) and open one session on the gated model."""
    graph = model.graph
    gates, selected = [], []
    for r in rewrites:
        g = ir.Value(name=f"{GATE_PREFIX}{r.site.id}", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
        graph.inputs.append(g)
        uses = list(r.site.output.uses())
        is_output = r.site.output in graph.outputs
        node = ir.node("Where", [g, r.value, r.site.output], name=f"attnrewrite/{r.site.id}/gate")
        out = node.outputs[0]
        out.name, out.type, out.shape = f"attnrewrite/{r.site.id}/gated", r.site.output.type, r.site.output.shape
        graph.insert_after(r.value.producer() if r.value.producer() is not None else graph[-1], node)
        for user, index in uses:
            user.replace_input_with(index, out)
        if is_output:
            graph.outputs[graph.outputs.index(r.site.output)] = out
        gates.append(g)
        selected.append(out)
    common_passes.TopologicalSortPass()(model)
    gated = GatedModel(model, list(rewrites), gates, selected)
    gated.session = make_session(model, base_dir)
    return gated


def budget_score(budgets, metrics: dict[str, dict[str, float]]) -> float:
    """How far one configuration is from (or past) the first budget, as a number where larger is
    worse: the budget's metric on its worst output, negated when higher is better."""
    budget = budgets[0]
    values = [float(m[budget.metric]) for name, m in metrics.items() if budget.metric in m and budget.output in (None, name)]
    if not values:
        return 0.0
    worst = values[0]
    for v in values[1:]:
        if budget.worse(v, worst):
            worst = v
    if np.isnan(worst):
        return float("inf")
    return -worst if budget.op in (">=", ">") else worst


def summary(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The leave-one-in drift a report shows: cosine and rel_l2 on the worst output."""
    cos = [m["cosine"] for m in metrics.values() if "cosine" in m]
    rel = [m["rel_l2"] for m in metrics.values() if "rel_l2" in m]
    return {**({"cosine": min(cos)} if cos else {}), **({"rel_l2": max(rel)} if rel else {})}


def compare(original, outputs, names) -> dict[str, dict[str, float]]:
    return M.compare_outputs(original, {n: outputs[n] for n in names})
