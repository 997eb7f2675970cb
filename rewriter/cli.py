"""The `attnrewrite` command line.

`attnrewrite MODEL --pass NAME` is the main job; `inspect`, `audit` and `bench` are subcommands of the
same click group. Exit codes are part of the interface (CI gates on them): 0 ok, 1 accuracy budget
exceeded, 2 usage or input error, 3 runtime failure, 4 no attention found. Errors are one sentence on
stderr, never a traceback (set ATTNREWRITE_DEBUG=1 to see one).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from attnrewrite import __version__
from attnrewrite.errors import AttnRewriteError, InputError, NoAttentionFound

stderr = Console(stderr=True)


class MainGroup(click.Group):
    """A group whose first argument may be a model path: `attnrewrite m.onnx --pass x` means `rewrite`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["rewrite", *args]
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Map errors to exit codes here, so the console script, `python -m` and click's CliRunner
        all see the same one-sentence errors and codes."""
        code = _run_mapped(lambda: super(MainGroup, self).main(
            args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra))
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(cls=MainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="attnrewrite")
def cli() -> None:
    """Find the softmax attention in an ONNX model, rewrite it into an efficient variant, and audit
    the drift.

    \b
      attnrewrite model.onnx --pass linear         rewrite; writes model.linear.onnx
      attnrewrite inspect model.onnx               list the attention sites
      attnrewrite audit a.onnx b.onnx --budget 'cosine>=0.999'
      attnrewrite bench a.onnx b.onnx
      attnrewrite kernels check --interpret       fused GPU kernels vs their references
      attnrewrite m.onnx --pass window --target tensorrt; attnrewrite build m.window.trt.onnx --engine m.plan
      attnrewrite m.onnx --pass auto --budget 'cosine>=0.99' --calib data.npz --report out/
      attnrewrite torch pkg.mod:factory --input-shape x=1x3x224x224 --pass window:size=7 -o m.onnx

    Exit codes: 0 ok, 1 accuracy budget exceeded, 2 usage/input error, 3 runtime failure,
    4 no attention found.
    """


def print_report(kind: str, document: dict) -> None:
    from attnrewrite.validate.report import SECTIONS, print_rich

    print_rich(SECTIONS[kind](document))


def emit_json(document: dict) -> None:
    """Exactly one JSON document on stdout."""
    click.echo(json.dumps(document, indent=2, default=_json_default))


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--no-verify", is_flag=True, help="Skip the numerical check of each site (faster, less certain).")
def inspect_cmd(model: str, as_json: bool, no_verify: bool) -> None:
    """List the attention sites of MODEL (and the softmaxes that are not attention, with reasons)."""
    from attnrewrite.onnx.analysis import analyze

    with _status("Analysing model", quiet=as_json):
        analysis = analyze(model, verify=not no_verify)
    document = analysis.to_json()
    if as_json:
        emit_json(document)
    else:
        print_report("inspect", document)
    if not document["sites"]:
        raise NoAttentionFound(f"{model}: no attention found ({len(document['rejected'])} softmax/attention nodes rejected).")


def _calibration_options(fn):
    fn = click.option("--calib", "calib", type=str, default=None,
                      help="Calibration inputs: .npz keyed by input names, a folder of .npy/images; default: seeded random.")(fn)
    fn = click.option("--shape", "shapes", multiple=True, help="Concrete shape for a dynamic input, e.g. pixel_values=1x3x224x224.")(fn)
    fn = click.option("--samples", type=int, default=8, show_default=True, help="Random calibration samples when no --calib.")(fn)
    fn = click.option("--seed", type=int, default=0, show_default=True, help="Seed for random calibration inputs.")(fn)
    return fn


def _load_calibration(model_path: str, calib, shapes, samples, seed):
    from attnrewrite.validate import calib as C

    specs = C.input_specs(model_path)
    overrides = C.parse_shape_overrides(list(shapes))
    return C.load_calibration(calib, specs, overrides, num_samples=samples, seed=seed)


def _budgets(texts) -> list:
    from attnrewrite.validate import metrics as M

    return [M.parse_budget(t) for t in texts]


def _check_budget_outputs(budgets, outputs: list[str]) -> None:
    from attnrewrite.validate import metrics as M

    M.check_output_names(budgets, outputs)


def _output_names(path: str) -> list[str]:
    from attnrewrite.onnx.modelio import load_model

    return [v.name for v in load_model(path).graph.outputs]


def _budget_summary(budgets, failures: list[str]) -> list[dict]:
    out = []
    for b in budgets:
        text = str(b)
        mine = [f for f in failures if f.startswith(text + ":")]
        out.append({"budget": text, "passed": not mine, "detail": "; ".join(mine) or None})
    return out


def default_output(model: str, specs, target: str = "onnxruntime") -> str:
    path = os.path.abspath(model)
    stem = path[:-5] if path.endswith(".onnx") else path
    suffix = ".trt" if target == "tensorrt" else ""
    return f"{stem}.{'.'.join(s.name for s in specs) or 'auto'}{suffix}.onnx"


@cli.command("rewrite", hidden=True)
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--pass", "passes", multiple=True, required=True, metavar="NAME[:k=v,...]",
              help="Pass to apply, in order (repeatable). `attnrewrite passes` lists them.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), help="Output path (default MODEL.<passes>.onnx).")
@_calibration_options
@click.option("--sites", "selectors", multiple=True, help="Sites to rewrite: ids, ranges (1-10) or predicates (q_len>=1024).")
@click.option("--budget", "budget_texts", multiple=True,
              help="Accuracy budget, e.g. 'cosine>=0.999' or 'OUTPUT:cosine>=0.99' for one output (exit 1 if not met).")
@click.option("--fallback", is_flag=True,
              help="Keep the original attention at the most sensitive sites (leave-one-in drift) until the budget holds.")
@click.option("--fallback-order", type=click.Choice(["sensitivity", "local"]), default="sensitivity", show_default=True,
              help="What --fallback reverts first: the sites whose rewrite alone moves the output most, or the sites "
                   "with the largest local drift (no extra runs).")
@click.option("--sensitivity", is_flag=True,
              help="Measure each site's leave-one-in drift: the model with only that site rewritten (one run per site).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=str),
              help="Write report.json, report.md and report.html (drift bars, attention maps, speed) here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt: sites with a fused kernel become plugin nodes (with ONNX bodies for onnxruntime); "
                   "see `attnrewrite build`.")
@click.option("--plan", "plan_out", type=click.Path(dir_okay=False, path_type=str),
              help="--pass auto: write the chosen plan (site -> pass) to this JSON file.")
@click.option("--plan-in", "plan_in", type=click.Path(dir_okay=False, path_type=str),
              help="--pass auto: replay a plan written by --plan, without searching.")
def rewrite_cmd(model, passes, output, calib, shapes, samples, seed, selectors, budget_texts, fallback, fallback_order,
                sensitivity, report_dir, as_json, force, target, plan_out, plan_in):
    """Rewrite the attention of MODEL with one or more passes, validating the drift of each."""
    from attnrewrite import select
    from attnrewrite.errors import BudgetExceeded
    from attnrewrite.onnx.modelio import load_model, save_model
    from attnrewrite.validate.pipeline import Pipeline
    from attnrewrite.progress import progress_for
    from attnrewrite.registry import parse_pass
    from attnrewrite.validate.report import clean, header, write_report

    auto = next((p for p in passes if p.partition(":")[0].strip() == "auto"), None)
    if auto and len(passes) > 1:
        raise InputError("--pass auto chooses the pass per site; give it alone (no other --pass).")
    if (plan_out or plan_in) and not auto:
        raise InputError("--plan and --plan-in go with --pass auto.")
    if auto and (fallback or target != "onnxruntime"):
        raise InputError("--pass auto already keeps sites within the budget; it takes neither --fallback nor --target.")
    specs = [] if auto else [parse_pass(p) for p in passes]
    auto_options = None
    if auto:
        from attnrewrite.validate.auto import parse_auto

        auto_options = parse_auto(auto)  # a bad option is a usage error before any model runs
    select.validate(selectors)
    budgets = _budgets(budget_texts)
    replay = _read_plan(plan_in) if plan_in else None
    if fallback and not budgets:
        raise InputError("--fallback needs at least one --budget to aim for.")
    if target == "tensorrt" and len(specs) > 1:
        # each pass starts by inlining local functions, which would dissolve the plugin nodes of the last
        raise InputError("--target tensorrt takes one --pass (write the other passes first, then rewrite that model).")
    out = output or default_output(model, specs, target)
    if os.path.abspath(out) == os.path.abspath(model):
        raise InputError("refusing to write the output over the input model; choose another -o.")
    if os.path.exists(out) and not force:
        raise InputError(f"{out} already exists; pass --force to overwrite it.")
    ir_model = load_model(model)
    _check_budget_outputs(budgets, [v.name for v in ir_model.graph.outputs])
    calibration = _load_calibration(model, calib, shapes, samples, seed)
    progress = progress_for(as_json)
    pipeline = Pipeline(path=__import__("pathlib").Path(model), batches=calibration.batches, budgets=budgets,
                        selectors=tuple(selectors), fallback=fallback, progress=progress,
                        calibrated=bool(calib), target=target, sensitivity=sensitivity,
                        fallback_order=fallback_order, attention_maps=bool(report_dir))
    if auto:
        reports = []
        pass_docs = [pipeline.run_auto(ir_model, auto_options, replay)]
        found = bool(pass_docs[0]["sites"])
    else:
        reports = pipeline.run(ir_model, specs)
        pass_docs = [r.to_json() for r in reports]
        found = bool(reports[0].sites)
    if not found:
        raise NoAttentionFound(f"{model}: no attention found; nothing to rewrite (see `attnrewrite inspect`).")
    save_model(ir_model, out, force=force, protect=(model,))
    failures = pass_docs[-1]["budget_failures"]
    if plan_out:
        from attnrewrite.validate.report import atomic_write

        plan_doc = {"tool": "attnrewrite", "model": os.path.abspath(model), "budgets": [str(b) for b in budgets],
                    **pass_docs[0]["plan"]}
        atomic_write(Path(plan_out), json.dumps(plan_doc, indent=2))
    document = clean({
        **header(model, calibration),
        "command": "rewrite",
        "output": str(out),
        "target": target,
        "status": "budget_exceeded" if failures else "ok",
        "budgets": _budget_summary(budgets, failures),
        "passes": pass_docs,
    })
    if report_dir:
        document["speed"] = _speed([model, out], calibration, progress)
        write_report(report_dir, document, [m for r in reports for m in r.maps])
    if as_json:
        emit_json(document)
    else:
        print_report("rewrite", document)
    if failures:
        raise BudgetExceeded(f"accuracy budget not met: {'; '.join(failures)} (model written to {out}).")


@cli.command("audit")
@click.argument("before", type=click.Path(dir_okay=False, path_type=str))
@click.argument("after", type=click.Path(dir_okay=False, path_type=str))
@_calibration_options
@click.option("--budget", "budget_texts", multiple=True,
              help="Accuracy budget (repeatable), e.g. 'OUTPUT:top1>=0.99'; default 'cosine>=0.999'.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=str),
              help="Write report.json, report.md and report.html (drift bars, speed) here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def audit_cmd(before, after, calib, shapes, samples, seed, budget_texts, report_dir, as_json):
    """Compare AFTER with BEFORE on the same inputs: model-level and per-site drift (exit 1 over budget)."""
    from attnrewrite.validate.audit import audit
    from attnrewrite.errors import BudgetExceeded
    from attnrewrite.progress import progress_for
    from attnrewrite.validate.report import write_report

    budgets = _budgets(budget_texts or ("cosine>=0.999",))
    calibration = _load_calibration(before, calib, shapes, samples, seed)
    _check_budget_outputs(budgets, _output_names(before))
    document = audit(before, after, calibration, budgets, progress_for(as_json))
    if report_dir:
        document["speed"] = _speed([before, after], calibration, progress_for(as_json))
        write_report(report_dir, document)
    if as_json:
        emit_json(document)
    else:
        print_report("audit", document)
    failed = [b for b in document["budgets"] if not b["passed"]]
    if failed:
        raise BudgetExceeded("accuracy budget not met: " + "; ".join(b["detail"] or b["budget"] for b in failed) + ".")


@cli.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=str))
@click.option("--shape", "shapes", multiple=True, help="Concrete shape for a dynamic input, e.g. pixel_values=1x3x224x224.")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--repeats", type=int, default=20, show_default=True)
@click.option("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def bench_cmd(models, shapes, warmup, repeats, threads, as_json):
    """Time MODELS side by side in one process (interleaved repeats); ratios are vs the first model."""
    from attnrewrite.validate import bench as B
    from attnrewrite.validate import calib as C
    from attnrewrite.onnx.modelio import load_model
    from attnrewrite.progress import progress_for

    for m in models:
        load_model(m)  # validates paths and external data with one clear sentence
    specs = C.input_specs(models[0])
    resolved = C.resolve_shapes(specs, C.parse_shape_overrides(list(shapes)))
    for other in models[1:]:
        names = [s.name for s in C.input_specs(other)]
        if names != [s.name for s in specs]:
            raise InputError(f"{other} has inputs {names}, {models[0]} has {[s.name for s in specs]}; bench needs the same inputs.")
    feeds = C.load_calibration(None, specs, {k: v for k, v in resolved.items()}, num_samples=1, seed=0).batches[0]
    progress = progress_for(as_json)
    with progress.task("benchmarking", warmup * len(models) + repeats * len(models)) as tick:
        results = B.bench_models(list(models), feeds, warmup=warmup, repeats=repeats, threads=threads,
                                 progress=lambda *_: tick())
    document = {"command": "bench", "threads": threads, "repeats": repeats,
                "results": [dataclasses_asdict(r) for r in results]}
    if as_json:
        emit_json(document)
        return
    print_report("bench", document)


def _read_plan(path: str) -> dict:
    """A plan written by `--plan`: {"sites": {site id: pass spec or "original"}}."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the plan {path}: {exc}.") from None
    sites = doc.get("sites") if isinstance(doc, dict) else None
    if not isinstance(sites, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sites.items()):
        raise InputError(f"{path} is not a plan written by --plan (it needs a 'sites' object of site id -> pass).")
    return doc


def _speed(models: list[str], calibration, progress, repeats: int = 5) -> dict:
    """Time `models` side by side on the first calibration sample (a report's speed table)."""
    from attnrewrite.validate import bench as B

    feeds = {k: v[:1] for k, v in calibration.batches[0].items()}
    with progress.task("timing for the report", len(models) * (1 + repeats)) as tick:
        results = B.bench_models(list(models), feeds, warmup=1, repeats=repeats, progress=lambda *_: tick())
    return {"command": "bench", "threads": None, "repeats": repeats, "results": [dataclasses_asdict(r) for r in results]}


def dataclasses_asdict(obj):
    import dataclasses

    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in dataclasses.asdict(obj).items()}


@cli.command("torch")
@click.argument("factory", metavar="PKG.MODULE:FACTORY")
@click.option("--input-shape", "input_shapes", multiple=True, required=True, metavar="NAME=1x3x224x224",
              help="Name and shape of each input the module takes, in order (repeatable); random example inputs.")
@click.option("--pass", "passes", multiple=True, required=True, metavar="NAME[:k=v,...]", help="Pass to apply (repeatable).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str), help="ONNX file to write.")
@click.option("--calib", type=click.Path(dir_okay=False, path_type=str),
              help=".npz with one array per input name (samples on axis 0) to fit and validate on.")
@click.option("--budget", "budget_texts", multiple=True, help="Accuracy budget on the module's outputs (exit 1 if not met).")
@click.option("--fallback", is_flag=True,
              help="Keep the sites the --budget cannot afford on their original attention (leave-one-in order).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def torch_cmd(factory, input_shapes, passes, output, calib, budget_texts, fallback, as_json, force):
    """Rewrite the nn.Module that FACTORY builds (the torch front-end) and export it to ONNX."""
    import importlib

    import numpy as np

    try:
        import torch
    except ImportError:
        raise InputError("the torch front-end needs torch (pip install 'attnrewrite[torch]').") from None
    from attnrewrite import torch as art

    if os.path.exists(output) and not force:
        raise InputError(f"{output} already exists; pass --force to overwrite it.")
    module_name, _, attr = factory.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise InputError(f"cannot import {factory!r} ({exc}); give PKG.MODULE:FACTORY, a callable that returns the module.") from None
    module = builder()
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"{factory} returned {type(module).__name__}, not a torch.nn.Module.")
    names, shapes = [], []
    for text in input_shapes:
        name, _, dims = text.partition("=")
        try:
            shapes.append(tuple(int(d) for d in dims.lower().split("x")))
        except ValueError:
            raise InputError(f"--input-shape {text!r}: write NAME=1x3x224x224.") from None
        names.append(name)
    generator = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(shape, generator=generator) for shape in shapes)
    batches = None
    if calib:
        data = np.load(calib)
        missing = [n for n in names if n not in data]
        if missing:
            raise InputError(f"{calib} lacks arrays for the inputs {missing} (it has {list(data)}).")
        count = len(data[names[0]])
        batches = [tuple(torch.as_tensor(data[n][i:i + 8]) for n in names) for i in range(0, count, 8)]
    new, report = art.rewrite(module, example, list(passes), calib=batches, budgets=list(budget_texts),
                              fallback=fallback)
    fd, tmp = __import__("tempfile").mkstemp(suffix=".onnx", dir=os.path.dirname(os.path.abspath(output)))
    os.close(fd)
    try:
        art.export(new, example, tmp, input_names=names)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    report = {"command": "torch", "factory": factory, "output": output, **report}
    if as_json:
        emit_json(report)
    else:
        for p in report["passes"]:
            Console(stderr=False).print(f"pass {p['label']}: rewrote {', '.join(p['rewritten']) or 'no site'}")
            for site in p["sites"]:
                if site["status"] != "rewritten":
                    Console(stderr=False).print(escape(f"  {site['id']}: {site['status']} ({site['reason']})"))
        Console(stderr=False).print(escape(f"model drift vs original: {report['metrics_vs_original']}"))
        Console(stderr=False).print(f"wrote {output}")
    if report["budget_failures"]:
        from attnrewrite.errors import BudgetExceeded

        raise BudgetExceeded("accuracy budget not met: " + "; ".join(report["budget_failures"]) + ".")


@cli.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def passes_cmd(as_json: bool) -> None:
    """List the available passes and their parameters (defaults as `--pass` accepts them)."""
    from attnrewrite.registry import describe_passes

    passes = describe_passes()
    if as_json:
        emit_json({"command": "passes", "passes": passes})
        return
    for p in passes:
        click.echo(f"{p['name']}{' (exact)' if p['exact'] else ''}: {p['description']}")
        for param in p["params"]:
            choices = f" [{'|'.join(param['choices'])}]" if param["choices"] else ""
            click.echo(f"    {param['name']}={param['default']}{choices}  {param['help']}")


class _status:
    """A spinner on stderr while long work runs, only on a TTY and never in --json mode."""

    def __init__(self, text: str, *, quiet: bool):
        self.enabled = not quiet and sys.stderr.isatty()
        self.text = text
        self._ctx = None

    def __enter__(self):
        if self.enabled:
            self._ctx = stderr.status(self.text)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False


def _add_kernels() -> None:
    from attnrewrite.build_cli import build_cmd
    from attnrewrite.kernels_cli import kernels_cmd

    cli.add_command(kernels_cmd)
    cli.add_command(build_cmd)


_add_kernels()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and return its documented exit code (errors are one sentence on stderr)."""
    return cli.main(args=argv, prog_name="attnrewrite", standalone_mode=False)


def _run_mapped(invoke) -> int:
    """Run `invoke()`, turning every error into one sentence on stderr and its documented exit code."""
    try:
        invoke()
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        stderr.print("aborted.")
        return 3
    except click.ClickException as exc:
        stderr.print(f"[red]error:[/red] {escape(exc.format_message())}", highlight=False)
        return 2
    except AttnRewriteError as exc:
        color = "yellow" if exc.exit_code in (1, 4) else "red"
        stderr.print(f"[{color}]{_label(exc)}:[/{color}] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 3
    except Exception as exc:  # noqa: BLE001 - the documented contract is one sentence, exit 3
        if os.environ.get("ATTNREWRITE_DEBUG"):
            traceback.print_exc()
        stderr.print(f"[red]runtime failure:[/red] {type(exc).__name__}: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 3
    return 0


def _label(exc: AttnRewriteError) -> str:
    if isinstance(exc, InputError):
        return "error"
    if isinstance(exc, NoAttentionFound):
        return "no attention"
    return {1: "budget exceeded"}.get(exc.exit_code, "runtime failure")


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
