"""`attnrewrite kernels`: list the fused kernels, check them against their references, write PTX.

Kept apart from `cli.py` because nothing here touches a model, and triton/torch are optional: the
listing needs neither, `check` and `ptx` say in one sentence what is missing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from attnrewrite.errors import BudgetExceeded, InputError


def _emit_json(document: dict) -> None:
    from attnrewrite.cli import emit_json

    emit_json(document)


@click.group("kernels", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.pass_context
def kernels_cmd(ctx: click.Context, as_json: bool) -> None:
    """The fused GPU kernels (Triton) behind `--target tensorrt`: list them, `check` them, build `ptx`."""
    if ctx.invoked_subcommand is not None:
        return
    from attnrewrite.plugins.catalog import INT4_NOTE, KERNELS

    if as_json:
        _emit_json({"command": "kernels", "kernels": [k.__dict__ for k in KERNELS], "notes": [INT4_NOTE]})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fused kernels (attnrewrite.plugins)")
    for col in ("kernel", "TensorRT plugin", "passes", "semantics", "formats"):
        table.add_column(col)
    for k in KERNELS:
        table.add_row(k.name, k.plugin, ", ".join(k.passes), k.semantics, k.formats)
    console = Console()
    console.print(table)
    console.print(f"note: {INT4_NOTE}.")


@kernels_cmd.command("check")
@click.option("--interpret", is_flag=True, help="Run on CPU in Triton's interpreter (no GPU needed).")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="I/O dtypes to check (default: all the device can run).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def check_cmd(interpret: bool, dtypes: tuple[str, ...], as_json: bool) -> None:
    """Run every kernel against its pass's reference on small shapes; exit 1 on a mismatch."""
    from attnrewrite.plugins import loader

    if interpret:
        loader.use_interpreter()
    loader.require_triton()
    import torch

    from attnrewrite.plugins import check

    if not interpret and not torch.cuda.is_available():
        raise InputError("no CUDA GPU here; use --interpret to run the kernels in Triton's CPU interpreter.")
    if interpret and "bfloat16" in dtypes:
        raise InputError("bfloat16 cannot be checked in the interpreter (Triton 3.9 computes bf16 dots wrongly there); "
                         "check it on a GPU.")
    dtypes = dtypes or (check.INTERPRETER_DTYPES if interpret else check.DTYPES)
    from attnrewrite.progress import progress_for

    device = "cpu" if interpret else "cuda"
    with progress_for(as_json).task("checking kernels", len(check.cases()) * len(dtypes)) as advance:
        results = check.run_all(dtypes, device=device, progress=advance)
    bad = [r for r in results if not r.ok]
    if as_json:
        _emit_json({"command": "kernels check", "device": device, "results": [r.to_json() for r in results],
                    "ok": not bad})
    else:
        _print_results(results, device)
    if bad:
        worst = max(bad, key=lambda r: r.max_error / max(r.tolerance, 1e-30))
        raise BudgetExceeded(f"{len(bad)} of {len(results)} kernel checks exceed their tolerance; worst: {worst.kernel} "
                             f"({worst.case}, {worst.dtype}) max error {worst.max_error:.2e} > {worst.tolerance:.1e}.")


def _print_results(results, device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kernels vs their references ({device})")
    for col in ("kernel", "case", "dtype", "max error", "tolerance", ""):
        table.add_column(col)
    for r in results:
        table.add_row(r.kernel, r.case, r.dtype, f"{r.max_error:.2e}", f"{r.tolerance:.1e}",
                      "ok" if r.ok else "[red]MISMATCH[/red]")
    Console().print(table)


@kernels_cmd.command("ptx")
@click.option("--arch", type=click.Choice(["sm_80", "sm_90"]), required=True, help="Target GPU architecture.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write the PTX files and manifest.<arch>.json into.")
@click.option("--head-dim", type=int, default=64, show_default=True, help="Head dimension compiled in.")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float16", "bfloat16", "float32"]),
              help="I/O dtypes (default: all three).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def ptx_cmd(arch: str, out_dir: Path, head_dim: int, dtypes: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Compile every kernel variant ahead of time to PTX for ARCH (no GPU needed): a plugin's payload."""
    from attnrewrite.plugins import aot, loader

    if head_dim < 1:
        raise InputError(f"--head-dim must be positive, got {head_dim}.")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise InputError(f"{out_dir} exists and is not empty; pass --force to replace it.")
    if loader.interpreting():
        raise InputError("TRITON_INTERPRET is set: ahead-of-time compilation needs compiled triton; unset it.")
    loader.require_triton()
    from attnrewrite.progress import progress_for

    variants = aot.variants(head_dim, dtypes or tuple(aot.DTYPES))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ptx-", dir=out_dir.parent))
    try:
        with progress_for(as_json).task(f"compiling for {arch}", len(variants)) as advance:
            manifest = aot.write_payloads(arch, staging, variants, progress=advance)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if as_json:
        _emit_json({"command": "kernels ptx", "arch": arch, "output": str(out_dir), "payloads": manifest})
        return
    for entry in manifest:
        click.echo(f"{entry['file']}  ({entry['symbol']}, {entry['num_warps']} warps, {entry['shared_bytes']} B shared)")
    click.echo(f"wrote {len(manifest)} PTX payloads and manifest.{arch}.json to {out_dir}")
