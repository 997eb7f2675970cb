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

import click
from rich.console import Console
from rich.table import Table

from attnrewrite import __version__
from attnrewrite.errors import AttnRewriteError, InputError, NoAttentionFound

stderr = Console(stderr=True)


class MainGroup(click.Group):
    """A group whose first argument may be a model path: `attnrewrite m.onnx --pass x` means `rewrite`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["rewrite", *args]
        return super().parse_args(ctx, args)


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

    Exit codes: 0 ok, 1 accuracy budget exceeded, 2 usage/input error, 3 runtime failure,
    4 no attention found.
    """


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
    from attnrewrite.analysis import analyze

    with _status("Analysing model", quiet=as_json):
        analysis = analyze(model, verify=not no_verify)
    document = analysis.to_json()
    if as_json:
        emit_json(document)
    else:
        _print_sites(document)
    if not document["sites"]:
        raise NoAttentionFound(f"{model}: no attention found ({len(document['rejected'])} softmax/attention nodes rejected).")


def _print_sites(document: dict) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"{document['model']} (opset {document['opset']}): {len(document['sites'])} attention sites")
    for col in ("id", "op", "kind", "heads×dim", "q×kv", "inst", "scale", "bias", "grid+prefix", "window", "rope", "ok"):
        table.add_column(col)
    for s in document["sites"]:
        grid = f"{s['grid'][0]}×{s['grid'][1]}+{s['prefix_tokens']}" if s["grid"] else "-"
        table.add_row(
            s["id"], s["op"], s["kind"], f"{s['num_heads']}×{s['head_dim']}", f"{s['q_len']}×{s['kv_len']}",
            str(s["instances"]), f"{s['scale']:.4g}", s["bias"], grid,
            f"{s['window'][0]}×{s['window'][1]}" if s["window"] else "-", "yes" if s["rotary"] else "-",
            "✓" if s["verified"] else "✗",
        )
    console.print(table)
    if document["rejected"]:
        rej = Table(title="Not rewritable")
        rej.add_column("node")
        rej.add_column("reason")
        for r in document["rejected"]:
            rej.add_row(r["node"], r["reason"])
        console.print(rej)
    console.print(
        "[dim]Prefix tokens (CLS, distillation, registers) stay global under spatial passes unless "
        "prefix=local is asked for.[/dim]"
    )


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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn errors into one sentence and a documented exit code."""
    try:
        cli.main(args=argv, prog_name="attnrewrite", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        stderr.print("aborted.")
        return 3
    except click.ClickException as exc:
        stderr.print(f"[red]error:[/red] {exc.format_message()}", highlight=False)
        return 2
    except AttnRewriteError as exc:
        color = "yellow" if exc.exit_code in (1, 4) else "red"
        stderr.print(f"[{color}]{_label(exc)}:[/{color}] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 3
    except Exception as exc:  # noqa: BLE001 - the documented contract is one sentence, exit 3
        if os.environ.get("ATTNREWRITE_DEBUG"):
            traceback.print_exc()
        stderr.print(f"[red]runtime failure:[/red] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
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
