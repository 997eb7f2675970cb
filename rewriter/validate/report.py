"""Reports: one JSON document (for scripts and CI) and the same facts as tables (for people).

Each kind of document (inspect, rewrite, audit, bench) is turned into `Section`s once, by one
function; the terminal (rich) and `report.md` (Markdown) render those same rows, so the two can
never disagree about what a report says.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from attnrewrite import __version__


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def header(input_path: str | os.PathLike, calibration) -> dict:
    return {
        "tool": "attnrewrite",
        "version": __version__,
        "input": {"path": str(input_path), "sha256": sha256_of(input_path)},
        "calibration": {"source": calibration.source, "num_samples": calibration.num_samples},
    }


def clean(obj):
    """JSON has no inf/nan: write them as strings so every parser reads the report."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "item"):
        return clean(obj.item())
    return obj


def write_report(directory: str | os.PathLike, document: dict, maps=()) -> Path:
    """Write report.json, report.md and report.html into `directory` (created if needed), each
    atomically; `maps` are the attention maps the HTML page draws."""
    from attnrewrite.validate.html_report import to_html

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "report.json", json.dumps(clean(document), indent=2))
    atomic_write(directory / "report.md", to_markdown(document))
    atomic_write(directory / "report.html", to_html(clean(document), maps))
    return directory


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` beside `path`, then rename: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclasses.dataclass(frozen=True)
class Section:
    """One table of a report, with lines that follow it (notes, budget verdicts)."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    after: tuple[str, ...] = ()


_METRIC_COLUMNS = ("cosine", "rel_l2", "max_abs", "snr_db", "top1")


def fmt(value) -> str:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def _metrics_rows(metrics: dict[str, dict[str, float]]) -> tuple[tuple[str, ...], ...]:
    return tuple((name, *(fmt(row.get(c)) for c in _METRIC_COLUMNS)) for name, row in metrics.items())


def _budget_lines(doc: dict) -> tuple[str, ...]:
    return tuple(f"budget {b['budget']}: {'ok' if b['passed'] else 'FAILED ' + (b.get('detail') or '')}".rstrip()
                 for b in doc.get("budgets", []))


def inspect_sections(doc: dict) -> list[Section]:
    rows = []
    for s in doc["sites"]:
        grid = "×".join(str(g) for g in s["grid"]) + f"+{s['prefix_tokens']}" if s["grid"] else "-"
        rows.append((
            s["id"], s["op"], s["kind"], f"{s['num_heads']}×{s['head_dim']}", f"{s['q_len']}×{s['kv_len']}",
            str(s["instances"]), f"{s['scale']:.4g}", s["bias"], grid,
            "×".join(str(w) for w in s["window"]) if s["window"] else "-", "yes" if s["rotary"] else "-",
            "✓" if s["verified"] else "✗",
        ))
    notes = collections.defaultdict(list)  # one line per distinct note, naming the sites it applies to
    for s in doc["sites"]:
        for note in s.get("notes", []):
            notes[note].append(s["id"])
    sections = [Section(
        f"{doc['model']} (opset {doc['opset']}): {len(doc['sites'])} attention sites",
        ("id", "op", "kind", "heads×dim", "q×kv", "inst", "scale", "bias", "grid+prefix", "window", "rope", "ok"),
        tuple(rows), tuple(f"{', '.join(ids)}: {note}" for note, ids in notes.items()))]
    if doc["rejected"]:
        sections.append(Section("Not rewritable", ("node", "reason"),
                                tuple((r["node"], r["reason"]) for r in doc["rejected"])))
    sections[-1] = dataclasses.replace(sections[-1], after=sections[-1].after + (
        "Prefix tokens (CLS, distillation, registers) stay global under spatial passes unless prefix=local is asked for.",))
    return sections


def rewrite_sections(doc: dict) -> list[Section]:
    sections = []
    for p in doc["passes"]:
        sections.append(Section(
            f"pass {p['label']}: {len(p['rewritten'])} sites rewritten in {p['seconds']} s "
            f"(kept original by fallback: {', '.join(p['kept_original']) or 'none'})",
            ("output", *_METRIC_COLUMNS), _metrics_rows(p["metrics_vs_original"])))
        if len(doc["passes"]) > 1:
            sections.append(Section(f"pass {p['label']} vs the previous pass", ("output", *_METRIC_COLUMNS),
                                    _metrics_rows(p["metrics_vs_previous"])))
        sections.append(_site_section(p["sites"]))
        if p.get("auto"):
            sections.append(_auto_section(p["auto"]))
        if any(site.get("plan") for site in p["sites"]):
            sections.append(_plan_section(p["label"], p["sites"]))
    sections += speed_sections(doc)
    if sections:
        sections[-1] = dataclasses.replace(sections[-1], after=_budget_lines(doc) + (f"wrote {doc['output']}",))
    return sections


def speed_sections(doc: dict) -> list[Section]:
    """`--report` times the models side by side (the same table as `attnrewrite bench`)."""
    if not doc.get("speed"):
        return []
    return [dataclasses.replace(s, title=f"speed: {s.title}") for s in bench_sections(doc["speed"])]


def _site_section(sites: list[dict]) -> Section:
    """One row per site; with `--target tensorrt` a column says which plugin carries it, or why none."""
    targeted = any(s.get("target") for s in sites)
    measured = any(s.get("sensitivity") for s in sites)
    rows = []
    for s in sites:
        loc, acc, alone = s.get("local") or {}, s.get("accumulated") or {}, s.get("sensitivity") or {}
        row = (s["id"], s["status"], fmt(loc.get("cosine")), fmt(loc.get("rel_l2")), fmt(acc.get("cosine")),
               fmt(acc.get("rel_l2")))
        row += (fmt(alone.get("cosine")), fmt(alone.get("rel_l2"))) if measured else ()
        rows.append(row + (s.get("reason") or "",) + ((s.get("target") or "",) if targeted else ()))
    columns = ("site", "status", "local cos", "local rel_l2", "acc cos", "acc rel_l2")
    columns += ("alone: model cos", "alone: model rel_l2") if measured else ()
    title = "per site (local: same inputs; accumulated: inside the rewritten model"
    title += "; alone: the model's worst output with only this site rewritten, what --fallback orders by)" if measured else ")"
    return Section(title, columns + ("reason",) + (("TensorRT",) if targeted else ()), tuple(rows))


def _auto_section(auto: dict) -> Section:
    """`--pass auto`: the final plan's drift as predicted from the leave-one-in runs (before it was
    measured) vs as measured, and the attention time it saves (sites timed alone on this machine)."""
    rows = (("predicted drift", fmt(auto.get("predicted_drift"))),
            ("predicted by", auto.get("predictor") or "-"),
            ("measured drift", fmt(auto.get("measured_drift"))),
            ("planned within (the budget's drift less any headroom)", fmt(auto.get("planned_within"))),
            ("drift measured as", f"distance of {auto['metric']} from its perfect value"),
            ("search steps (on the prediction)", fmt(auto.get("search_steps"))),
            ("relax steps (back to faster options the budget allows)", fmt(auto.get("relax_steps"))),
            ("repair steps (after measuring)", fmt(auto.get("repair_steps"))),
            ("attention time, original sites (ms)", fmt(auto.get("site_ms_original"))),
            ("attention time, plan (ms)", fmt(auto.get("site_ms_plan"))),
            ("attention speed-up of the plan", fmt(auto.get("site_speedup"))))
    return Section("auto: the plan", ("", "value"), rows)


def _plan_section(label: str, sites: list[dict]) -> Section:
    """What the pass decided or fitted per site (orders, densities, scales); lists are per head."""
    rows = []
    for s in sites:
        for key, value in (s.get("plan") or {}).items():
            shown = ", ".join(fmt(v) for v in value) if isinstance(value, list) else fmt(value)
            rows.append((s["id"], key, shown))
    return Section(f"what {label} decided per site (lists: one value per head)", ("site", "what", "value"), tuple(rows))


def audit_sections(doc: dict) -> list[Section]:
    sections = [Section(f"{doc['after']['path']} vs {doc['before']['path']}", ("output", *_METRIC_COLUMNS),
                        _metrics_rows(doc["model_metrics"]))]
    if doc["sites"]:
        sections.append(Section(
            f"per site (paired by {doc['pairing']})", ("site", "before", "after", "cosine", "rel_l2"),
            tuple((s["id"], s["before"], s["after"], fmt(s["cosine"]), fmt(s["rel_l2"])) for s in doc["sites"])))
    sections += speed_sections(doc)
    sections[-1] = dataclasses.replace(sections[-1], after=_budget_lines(doc))
    return sections


def bench_sections(doc: dict) -> list[Section]:
    return [Section(
        f"onnxruntime CPU, {doc['repeats']} interleaved repeats",
        ("model", "median ms", "p10 ms", "p90 ms", "speed-up vs first"),
        tuple((str(r["path"]), f"{r['median_ms']:.2f}", f"{r['p10_ms']:.2f}", f"{r['p90_ms']:.2f}",
               f"{r['ratio_vs_first']:.2f}×") for r in doc["results"]))]


SECTIONS = {"inspect": inspect_sections, "rewrite": rewrite_sections, "audit": audit_sections,
            "bench": bench_sections}


def print_rich(sections: list[Section]) -> None:
    """The sections as rich tables on stdout (full width on a terminal, 160 columns otherwise)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    for section in sections:
        table = Table(title=escape(section.title))
        for col in section.columns:
            table.add_column(col)
        for row in section.rows:
            table.add_row(*(escape(cell) for cell in row))
        console.print(table)
        for line in section.after:
            style = "red" if "FAILED" in line else "green" if line.startswith("budget ") else "dim"
            console.print(f"[{style}]{escape(line)}[/{style}]")


def to_markdown(doc: dict) -> str:
    """The document's provenance as a list, then the same sections the terminal shows."""
    command = doc.get("command", "rewrite")
    lines = [f"# attnrewrite report ({command})", ""]
    lines.append(f"- tool version: {doc.get('version')}")
    if "input" in doc:
        lines.append(f"- input: `{doc['input']['path']}` (sha256 `{doc['input']['sha256']}`)")
    for key in ("before", "after"):
        if key in doc:
            lines.append(f"- {key}: `{doc[key]['path']}` (sha256 `{doc[key]['sha256']}`)")
    if doc.get("output"):
        lines.append(f"- output: `{doc['output']}`")
    cal = doc.get("calibration", {})
    lines.append(f"- calibration: {cal.get('source')} ({cal.get('num_samples')} samples)")
    lines.append(f"- status: **{doc.get('status')}**")
    for p in doc.get("passes", []):
        lines.append(f"- pass `{p['label']}` parameters: `{json.dumps(p['params'])}`")
    lines.append("")
    for section in SECTIONS[command](doc):
        lines += [f"## {section.title}", "", "| " + " | ".join(section.columns) + " |",
                  "|" + "---|" * len(section.columns)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in section.rows]
        lines += ["", *(f"- {line}" for line in section.after), ""] if section.after else [""]
    return "\n".join(lines) + "\n"
