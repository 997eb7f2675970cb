"""`inspect`, `rewrite` and `export` for `nn.Module`s (see the package docstring).

`rewrite` traces a copy with `torch.export` (the original is never touched), detects the sites,
plans and fits them with the passes the ONNX path uses (fitting reads the sites' Q/K/V/output on the
calibration batches), puts a variant module (`modules.py`) in each site's place, and reports, like
the ONNX path, each site's local drift (the module against the original attention on the same
inputs) and the model's drift on the calibration batches, with budgets.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch

from attnrewrite.errors import InputError
from attnrewrite.registry import parse_pass
from attnrewrite.torch import modules as V
from attnrewrite.torch.detect import TorchSite, detect
from attnrewrite.validate import metrics as M
from attnrewrite.validate import sensitivity as S


def trace(module: torch.nn.Module, example_inputs: Sequence) -> torch.fx.GraphModule:
    """An aten-level GraphModule of a copy of `module`; one sentence when torch.export cannot trace it."""
    module = copy.deepcopy(module).eval()
    # the batch axis stays dynamic: calibration and users' batches need not match the example's
    # (a batch of 1 would be specialised by torch.export, so a one-sample example is traced twice over)
    batched = [isinstance(x, torch.Tensor) and x.dim() > 0 for x in example_inputs]
    dynamic = tuple({0: torch.export.Dim.AUTO} if b else None for b in batched)
    if _takes_varargs(module):  # torch.export matches dynamic_shapes to parameters: *args is one
        dynamic = (dynamic,)
    inputs = tuple(torch.cat([x, x]) if b and x.shape[0] == 1 else x for x, b in zip(example_inputs, batched))
    try:
        program = torch.export.export(module, inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InputError(f"torch.export cannot trace this module ({first}); make the failing op traceable, or "
                         "export to ONNX with torch.onnx.export and use the ONNX path (attnrewrite MODEL.onnx).") from None
    unlifted = program.module()
    # a plain GraphModule (torch.export's refuses .train(), and the rewritten module is meant to train)
    gm = torch.fx.GraphModule(unlifted, unlifted.graph)
    # values nobody reads go (nn.MultiheadAttention's averaged weights when the caller drops them), so
    # the attention weights they read are multiplied by V once, as detection requires
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _takes_varargs(module: torch.nn.Module) -> bool:
    import inspect as pyinspect

    params = list(pyinspect.signature(module.forward).parameters.values())
    return bool(params) and params[0].kind is pyinspect.Parameter.VAR_POSITIONAL


def inspect(module: torch.nn.Module, example_inputs: Sequence) -> list[TorchSite]:
    """The attention sites of `module` (with `SiteInfo` semantics: heads, scale, grid, prefix, ...)."""
    sites, _ = detect(trace(module, example_inputs))
    return sites


def rewrite(module: torch.nn.Module, example_inputs: Sequence, passes: Sequence[str], calib: Iterable | None = None,
            sites: Sequence[str] | None = None, budgets: Sequence[str] = (), fallback: bool = False,
            attention: str = "auto") -> tuple[torch.fx.GraphModule, dict]:
    """(the rewritten GraphModule, the report); `calib` is an iterable of input tuples (default: the
    example inputs), `sites` limits the rewrite to these site ids. `fallback` (with `budgets`) keeps
    the sites whose rewrite the budget cannot afford on their original attention, ordered by measured
    leave-one-in sensitivity as on the ONNX path. `attention` picks how masked variants compute
    (`modules.BACKENDS`: FlexAttention block masks, a dense mask, or auto: flex on CUDA)."""
    if attention not in V.BACKENDS:
        raise InputError(f"attention={attention!r}: choose one of {', '.join(V.BACKENDS)}.")
    if fallback and not budgets:
        raise InputError("fallback needs budgets: it keeps the sites the budget cannot afford original.")
    specs = [parse_pass(p) for p in passes]
    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in (calib or [tuple(example_inputs)])]
    for batch in batches:
        if len(batch) != len(example_inputs) or any(
                tuple(a.shape[1:]) != tuple(e.shape[1:]) for a, e in zip(batch, example_inputs)):
            raise InputError("a calibration batch does not match example_inputs (same inputs, same shapes after "
                             "the batch axis).")
    parsed = [M.parse_budget(b) for b in budgets]
    gm = trace(module, example_inputs)
    original = _run(gm, batches)
    reports = []
    for spec in specs:
        report, swaps = _apply(gm, spec, batches, sites, attention)
        if fallback and swaps:
            _fallback(gm, swaps, report, batches, original, parsed)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()  # a reverted site's variant module goes too
        gm.recompile()
        reports.append(report)
    final = _run(gm, batches)
    metrics = M.compare_outputs(original, final)
    failures = [str(f) for f in M.check_budgets(parsed, metrics)]
    return gm, {"front_end": "torch", "passes": reports, "metrics_vs_original": metrics, "budget_failures": failures,
                "status": "budget_exceeded" if failures else "ok"}


def export(module: torch.nn.Module, example_inputs: Sequence, path: str, opset: int = 18,
           input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None) -> str:
    """Export a (rewritten) module to ONNX with torch.onnx's dynamo exporter (a GraphModule's sizes are
    symbolic there; the TorchScript exporter would bake the batch size in), batch axis dynamic; inputs
    are named `input_names` (default input_0, input_1, ...), outputs `output_names` (the exporter's
    default when not given)."""
    import contextlib
    import io
    import warnings

    names = list(input_names or (f"input_{i}" for i in range(len(example_inputs))))
    # a batch of 1 would be specialised; trace with 2 (the same graph otherwise)
    example_inputs = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x
                           for x in example_inputs)
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(example_inputs), path, dynamo=True, opset_version=opset, input_names=names,
                          output_names=list(output_names) if output_names else None, dynamic_shapes=dynamic,
                          verbose=False)
    return path


# ---------------------------------------------------------------------------------------------------


def _run(gm, batches) -> dict[str, np.ndarray]:
    outs: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for batch in batches:
            result = gm(*batch)
            flat = result if isinstance(result, (tuple, list)) else (result,)
            for i, x in enumerate(flat):
                outs.setdefault(f"output_{i}", []).append(x.detach().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


class Recorder(torch.fx.Interpreter):
    """Runs the graph and keeps the values of `wanted` nodes."""

    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.values = set(wanted), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.values.setdefault(n, []).append(out.detach().numpy().copy())
        return out


def _activations(gm, sites, batches) -> dict:
    wanted = [x for s in sites for x in (s.q_node, s.k_node, s.v_node, s.output_node, s.bias_node) if x is not None]
    recorder = Recorder(gm, wanted)
    with torch.no_grad():
        for batch in batches:
            recorder.run(*batch)
    return {n: np.concatenate(v) for n, v in recorder.values.items()}


def _fallback(gm, swaps: dict, report: dict, batches, original, budgets) -> None:
    """Leave-one-in sensitivity per rewritten site (the model with only that site's variant), then
    `sensitivity.keep_within_budget`; the reverted sites' consumers read their original attention again."""
    def use(kept: set[str]) -> dict:
        for site_id, (old, new) in swaps.items():
            if site_id in kept and not new.users:
                old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
            elif site_id not in kept and new.users:
                new.replace_all_uses_with(old)
        gm.recompile()
        return M.compare_outputs(original, _run(gm, batches))

    outcomes = {o["id"]: o for o in report["sites"]}
    scores = {}
    for site_id in swaps:
        metrics = use({site_id})
        outcomes[site_id]["sensitivity"] = S.summary(metrics)
        scores[site_id] = S.budget_score(budgets, metrics)
    kept = S.keep_within_budget(list(swaps), scores, lambda on: not M.check_budgets(budgets, use(on)))
    use(kept)
    for site_id in set(swaps) - kept:
        outcomes[site_id].update(status="reverted", reason=(
            f"kept original attention by fallback (rewritten alone, the model's {budgets[0].metric} moves to "
            f"{abs(scores[site_id]):.6g})"))
    report["rewritten"] = [i for i in report["rewritten"] if i in kept]


def _apply(gm: torch.fx.GraphModule, spec, batches, only, attention: str = "auto") -> tuple[dict, dict]:
    """Rewrite every planned site of one pass; returns the pass report and, per rewritten site, the
    (original, variant) output nodes (the original stays in the graph until dead code is eliminated,
    so `_fallback` can point consumers back at it)."""
    found, rejected = detect(gm)
    outcomes = [{"id": node, "status": "not a site", "reason": why} for node, why in rejected]
    planned = []
    for site in found:
        if only is not None and site.id not in only:
            outcomes.append({"id": site.id, "status": "unselected", "reason": "not selected by sites="})
            continue
        reason = _unsupported(spec)
        plan = None if reason else spec.applies(site)
        reason = reason or (plan if isinstance(plan, str) else None)
        if reason:
            outcomes.append({"id": site.id, "status": "skipped", "reason": reason})
        else:
            planned.append((site, plan))
    acts = _activations(gm, [s for s, _ in planned], batches) if planned else {}
    swaps = {}
    for site, plan in planned:
        a = {role: acts[node] for role, node in (("q", site.q_node), ("k", site.k_node), ("v", site.v_node),
                                                 ("output", site.output_node), ("bias", site.bias_node)) if node is not None}
        if site.bool_mask:
            a["bias"] = V.additive_mask(a["bias"])
        if site.folded_heads:
            a = {role: x[:, None] for role, x in a.items()}
        if plan.needs_fit:
            plan = spec.impl.fit(site, a, plan)
            if isinstance(plan, str):
                outcomes.append({"id": site.id, "status": "skipped", "reason": plan})
                continue
        variant = _module(spec, site, plan, attention)
        with torch.no_grad():  # local drift on the activations as the pass saw them (4-D, additive bias)
            got = variant(*(torch.as_tensor(a[r]) for r in ("q", "k", "v", "bias") if r in a)).numpy()
        module = V.FoldedHeads(variant) if site.folded_heads else variant
        module = V.BoolMask(module) if site.bool_mask else module
        name = f"attnrewrite_{site.id}_{spec.name}"
        gm.add_submodule(name, module)
        args = (site.q_node, site.k_node, site.v_node) + ((site.bias_node,) if site.bias_node is not None else ())
        with gm.graph.inserting_after(site.output_node):
            new = gm.graph.call_module(name, args)
        site.output_node.replace_all_uses_with(new)
        new.meta["val"] = site.output_node.meta.get("val")
        swaps[site.id] = (site.output_node, new)
        outcomes.append({"id": site.id, "status": "rewritten", "reason": None,
                         "local": M.site_metrics(a["output"], got), "plan": plan.summary() or None})
    gm.recompile()
    outcomes.sort(key=lambda o: int(o["id"].rsplit("_", 1)[-1]) if o["id"].startswith("attn_") else -1)
    return {"pass": spec.name, "label": spec.label(), "sites": outcomes,
            "rewritten": [o["id"] for o in outcomes if o["status"] == "rewritten"]}, swaps


#: passes with a torch module (`_module`)
TORCH_PASSES = ("sdpa", "window", "block", "neighborhood", "grid", "halo", "linear", "quant", "int8", "int4", "paro")


def _unsupported(spec) -> str | None:
    if spec.name in TORCH_PASSES:
        return None
    return (f"{spec.name} has no torch module yet (the torch front-end has {', '.join(TORCH_PASSES)}); rewrite the "
            "exported ONNX for it")


def _module(spec, site: TorchSite, plan, attention: str = "auto") -> torch.nn.Module:
    if spec.name == "sdpa":
        return V.SoftmaxAttention(site.scale)
    if spec.name == "linear":
        if plan.local is not None:
            return V.LinearAttention(plan, site.scale, site.num_heads, plan.local.prefix, plan.local.allowed())
        prefix = (site.prefix_tokens or 0) if plan.options["prefix"] == "exact" else 0
        return V.LinearAttention(plan, site.scale, site.num_heads, prefix)
    if spec.name in ("quant", "int8", "int4"):
        return V.QuantAttention(plan.config, site.scale)
    if spec.name == "paro":
        from attnrewrite.passes import paro

        keep, cfg = paro.keep_mask(plan.frame, plan.tables), paro.quant_config(plan.options)
        if cfg.qk is None and cfg.pv is None:
            return V.MaskedAttention(keep, site.scale, backend=attention)
        return V.QuantAttention(cfg, site.scale, keep)
    zero_keys = spec.impl.zero_keys(site, plan) if hasattr(spec.impl, "zero_keys") else None
    return V.MaskedAttention(spec.impl.allowed(site, plan), site.scale, zero_keys, backend=attention)
