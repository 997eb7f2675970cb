"""`attnrewrite build`: a TensorRT engine from a model written with `--target tensorrt`.

The order of work is chosen so that what can run here does: the plugin graph TensorRT must parse
(function bodies stripped) is written and checked first, then TensorRT and the GPU are required
(exit 2 with one sentence each), then the engine is built, run on the calibration inputs and compared
with onnxruntime running the same model (bodies inlined), like any pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from attnrewrite.errors import BudgetExceeded, InputError


def stripped_path(engine: str) -> Path:
    """Where the plugin-only ONNX goes: beside the engine (`out.plan` → `out.plugins.onnx`)."""
    path = Path(engine)
    return path.with_name(path.stem + ".plugins.onnx")


@click.command("build")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--engine", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Serialized TensorRT engine to write (e.g. model.plan).")
@click.option("--fp16", is_flag=True, help="Let TensorRT run its own layers in fp16.")
@click.option("--int8", is_flag=True, help="Let TensorRT quantise its own layers to int8 (calibrated on --calib).")
@click.option("--calib", type=str, default=None, help="Calibration inputs for the comparison (and --int8).")
@click.option("--shape", "shapes", multiple=True, help="Concrete shape for a dynamic input, e.g. pixel_values=1x3x224x224.")
@click.option("--samples", type=int, default=8, show_default=True, help="Random samples when no --calib.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--budget", "budget_texts", multiple=True, help="Accuracy budget of the engine vs onnxruntime (exit 1 if not met).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def build_cmd(model, engine, fp16, int8, calib, shapes, samples, seed, budget_texts, force, as_json):
    """Build a TensorRT engine from MODEL (written by `--target tensorrt`) with the fused-kernel plugins."""
    from attnrewrite.cli import _budgets, _load_calibration, emit_json
    from attnrewrite.onnx.modelio import load_model, save_model
    from attnrewrite.plugins import onnx_nodes, tensorrt
    from attnrewrite.validate import metrics as M
    from attnrewrite.validate.calib import parse_shape_overrides
    from attnrewrite.validate.report import atomic_write

    if fp16 and int8:
        raise InputError("choose one of --fp16 and --int8.")
    if os.path.exists(engine) and not force:
        raise InputError(f"{engine} already exists; pass --force to overwrite it.")
    budgets = _budgets(budget_texts)
    ir_model = load_model(model)
    plugins = onnx_nodes.strip_bodies(ir_model)
    parser_graph = stripped_path(engine)
    save_model(ir_model, parser_graph, force=force, protect=(model,))
    _check_structure(parser_graph)
    try:
        tensorrt.require_tensorrt()
    except InputError as exc:
        raise InputError(f"{exc} once its function bodies are stripped: {parser_graph} is that graph "
                         f"({plugins} plugin node{'s' if plugins != 1 else ''}).") from None
    tensorrt.require_gpu()

    calibration = _load_calibration(model, calib, shapes, samples, seed)
    from attnrewrite.validate.runner import run_batches, session_from_path

    session = session_from_path(model)
    names = [o.name for o in session.get_outputs()]
    reference = run_batches(session, calibration.batches, names)
    overrides = {k: tuple(v) for k, v in parse_shape_overrides(list(shapes)).items()}
    serialized = tensorrt.build_engine(parser_graph, fp16=fp16, int8_batches=calibration.batches if int8 else None,
                                       shapes=overrides)
    atomic_write(Path(engine), serialized)
    measured = tensorrt.run_engine(serialized, calibration.batches, names)
    metrics = M.compare_outputs(reference, measured)
    failures = [str(f) for f in M.check_budgets(budgets, metrics)]
    document = {"command": "build", "input": model, "engine": engine, "plugin_graph": str(parser_graph),
                "plugin_nodes": plugins, "precision": "int8" if int8 else "fp16" if fp16 else "fp32",
                "metrics_engine_vs_onnxruntime": metrics, "budget_failures": failures}
    if as_json:
        emit_json(document)
    else:
        click.echo(f"engine {engine} ({document['precision']}, {plugins} plugin nodes); engine vs onnxruntime:")
        for output, values in metrics.items():
            click.echo(f"  {output}: " + ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
    if failures:
        raise BudgetExceeded(f"the engine drifts past the budget: {'; '.join(failures)} (engine written to {engine}).")


def _check_structure(path: Path) -> None:
    """The checker must accept the plugin graph (custom-domain nodes without bodies are legal ONNX)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"the plugin graph {path} fails the ONNX checker: {str(exc).splitlines()[0][:300]}") from exc

