"""Reports: one JSON document (for scripts and CI) and the same facts as Markdown (for people)."""

from __future__ import annotations

import hashlib
import json
import math
import os
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


def write_report(directory: str | os.PathLike, document: dict) -> Path:
    """Write report.json and report.md into `directory` (created if needed), each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / "report.json", json.dumps(clean(document), indent=2))
    _atomic_write(directory / "report.md", to_markdown(document))
    return directory


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def metrics_table(metrics: dict[str, dict[str, float]]) -> list[str]:
    cols = ["cosine", "rel_l2", "max_abs", "snr_db", "top1"]
    lines = ["| output | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in metrics.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return lines


def to_markdown(doc: dict) -> str:
    lines = [f"# attnrewrite report ({doc.get('command', 'rewrite')})", ""]
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
    for b in doc.get("budgets", []):
        lines.append(f"- budget `{b['budget']}`: {'ok' if b['passed'] else 'FAILED'} {b.get('detail') or ''}")
    lines.append("")
    for p in doc.get("passes", []):
        lines += [f"## pass `{p['label']}` ({p['seconds']} s)", ""]
        lines.append(f"parameters: `{json.dumps(p['params'])}`; rewritten {len(p['rewritten'])} sites; "
                     f"kept original by fallback: {', '.join(p['kept_original']) or 'none'}")
        lines += ["", "### model vs original", "", *metrics_table(p["metrics_vs_original"]), ""]
        lines += ["### model vs previous pass", "", *metrics_table(p["metrics_vs_previous"]), ""]
        lines += _site_lines(p["sites"])
    if "model_metrics" in doc:
        lines += ["## model outputs", "", *metrics_table(doc["model_metrics"]), ""]
    if "sites" in doc and isinstance(doc["sites"], list):
        lines += _site_lines(doc["sites"])
    return "\n".join(lines) + "\n"


def _site_lines(sites: list[dict]) -> list[str]:
    lines = ["### sites", "", "| site | status | local cosine | local rel_l2 | accumulated cosine | accumulated rel_l2 | reason |",
             "|---|---|---|---|---|---|---|"]
    for s in sites:
        loc, acc = s.get("local") or {}, s.get("accumulated") or {}
        lines.append(
            f"| {s['id']} | {s['status']} | {_fmt(loc.get('cosine'))} | {_fmt(loc.get('rel_l2'))} | "
            f"{_fmt(acc.get('cosine'))} | {_fmt(acc.get('rel_l2'))} | {s.get('reason') or ''} |"
        )
    return lines + [""]
