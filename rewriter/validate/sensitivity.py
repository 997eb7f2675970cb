"""Leave-one-in sensitivity and the `--fallback` search, on one gated onnxruntime session.

A site's local drift (its own output, same inputs) is a poor guide to what rewriting it does to the
model: on a real DINOv2 it ranks sites with Spearman 0.59 against the measured effect. What users
decide with is the model-level drift when *only that site* is rewritten. Measuring it naively takes
one session per site and per fallback step; instead every rewritten site's consumers read

    Where(gate_i == 2, alternative 2, Where(gate_i == 1, alternative 1, original attention))

with gate_i an int64 graph input, so one session runs any assignment of alternatives (a pass's rewrite
for `--fallback`, several candidates for `--pass auto`) by feeding gates. `GatedModel.close` then
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
    """Sites whose consumers read one of several branches, chosen per run by an int64 input per site:
    0 is the original attention, i the site's i-th alternative (`alternatives[site][i - 1]`)."""

    model: ir.Model
    sites: list  # AttentionSite
    alternatives: list[list[ir.Value]]
    gates: list[ir.Value]
    selected: list[ir.Value]
    added: list[list[ir.Node]]
    session: object = None

    def feeds(self, selection) -> dict[str, np.ndarray]:
        """Gate values for `selection`: {site id: branch}, or a set of site ids on their first alternative."""
        chosen = {i: 1 for i in selection} if isinstance(selection, (set, frozenset, list, tuple)) else dict(selection)
        return {g.name: np.array(chosen.get(site.id, 0), np.int64) for g, site in zip(self.gates, self.sites)}

    def run(self, selection, batches: list[dict[str, np.ndarray]], names: list[str],
            tick: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
        """The model with the sites on the branches of `selection`, on every batch."""
        flags = self.feeds(selection)
        return run_batches(self.session, [{**b, **flags} for b in batches], names, tick)

    def close(self, selection) -> None:
        """Consumers read the chosen branch at every site; the gates and their nodes are removed."""
        graph = self.model.graph
        flags = self.feeds(selection)
        for gate, site, alternatives, selected, nodes in zip(self.gates, self.sites, self.alternatives, self.selected,
                                                              self.added):
            branch = int(flags[gate.name])
            selected.replace_all_uses_with(alternatives[branch - 1] if branch else site.output, replace_graph_outputs=True)
            graph.remove(nodes, safe=True)
            graph.inputs.remove(gate)
        self.session = None


def gate(model: ir.Model, sites: Sequence, alternatives: Sequence[Sequence[ir.Value]], base_dir: Path | None) -> GatedModel:
    """Put a selector in front of every site's consumers (the sites must read their original attention,
    as after the probe) and open one session on the gated model."""
    graph = model.graph
    gates, selected, added = [], [], []
    for site, alts in zip(sites, alternatives):
        g = ir.Value(name=f"{GATE_PREFIX}{site.id}", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
        graph.inputs.append(g)
        uses = list(site.output.uses())
        is_output = site.output in graph.outputs
        current, nodes = site.output, []
        for i, alt in enumerate(alts, 1):
            index = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(i, np.int64))},
                            name=f"attnrewrite/{site.id}/gate_{i}_index")
            equal = ir.node("Equal", [g, index.outputs[0]], name=f"attnrewrite/{site.id}/gate_{i}_equal")
            where = ir.node("Where", [equal.outputs[0], alt, current], name=f"attnrewrite/{site.id}/gate_{i}")
            where.outputs[0].name = f"attnrewrite/{site.id}/gated_{i}"
            where.outputs[0].type, where.outputs[0].shape = site.output.type, site.output.shape
            nodes += [index, equal, where]
            current = where.outputs[0]
        graph.extend(nodes)
        for user, index in uses:
            user.replace_input_with(index, current)
        if is_output:
            graph.outputs[graph.outputs.index(site.output)] = current
        gates.append(g)
        selected.append(current)
        added.append(nodes)
    common_passes.TopologicalSortPass()(model)
    gated = GatedModel(model, list(sites), [list(a) for a in alternatives], gates, selected, added)
    gated.session = make_session(model, base_dir)
    return gated


def gate_rewrites(model: ir.Model, rewrites: Sequence, base_dir: Path | None) -> GatedModel:
    """One alternative per site: the pass's rewrite (branch 1) against the original (branch 0)."""
    return gate(model, [r.site for r in rewrites], [[r.value] for r in rewrites], base_dir)


def budget_score(budgets, metrics: dict[str, dict[str, float]]) -> float:
    """How far one configuration is from (or past) the first budget, as a number where larger is
    worse: the budget's metric on its worst output, negated when higher is better."""
    budget = budgets[0]
    found = M.worst_output(budget, metrics)
    if found is None:
        return 0.0
    worst = found[1]
    if np.isnan(worst):
        return float("inf")
    return -worst if budget.op in (">=", ">") else worst


def summary(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The leave-one-in drift a report shows: cosine and rel_l2 on the worst output."""
    cos = [m["cosine"] for m in metrics.values() if "cosine" in m]
    rel = [m["rel_l2"] for m in metrics.values() if "rel_l2" in m]
    return {**({"cosine": min(cos)} if cos else {}), **({"rel_l2": max(rel)} if rel else {})}


def keep_within_budget(ids: Sequence[str], scores: dict[str, float], holds: Callable[[set[str]], bool],
                       tick: Callable[[], None] | None = None) -> set[str]:
    """The sites `--fallback` keeps rewritten: revert the worst-scoring (most sensitive) one at a time
    until `holds(kept)`, then try each reverted site again, best first, keeping it when the budget still
    holds (drift is not additive across sites, so a site reverted early may fit after a later one).
    Shared by the ONNX pipeline and the torch front-end."""
    tick = tick or (lambda: None)
    on, reverted = set(ids), []
    tick()
    if holds(on):
        return on
    for site_id in sorted(ids, key=lambda i: -scores[i]):
        on.discard(site_id)
        reverted.append(site_id)
        tick()
        if holds(on):
            break
    for site_id in sorted(reverted, key=lambda i: scores[i]):
        on.add(site_id)
        tick()
        if not holds(on):
            on.discard(site_id)
    return on


def compare(original, outputs, names) -> dict[str, dict[str, float]]:
    return M.compare_outputs(original, {n: outputs[n] for n in names})
