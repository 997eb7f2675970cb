"""`report.html`: the report's tables plus figures, one self-contained page (images inline as PNG).

The tables are the same `Section`s the terminal and report.md show (one source of truth); the page
adds what tables cannot show: per-site drift bars (local, accumulated, and leave-one-in when
measured) and attention maps before/after for a few query tokens, on the token grid and over the
input image for vision models. Figures are drawn with matplotlib (the `[report]` extra; without it
the page says so and keeps the tables).
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from attnrewrite.validate.report import SECTIONS, Section

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } .ok { color: #176317; } .bad { color: #a40000; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; } p.note { color: #555; }
"""


def to_html(document: dict, maps=()) -> str:
    """The page for a rewrite or audit `document`; `maps` are `attention_maps.AttentionMap`s."""
    kind = document.get("command", "rewrite")
    body = [f"<h1>attnrewrite {html.escape(kind)}: {html.escape(_title(document))}</h1>", _status(document)]
    body += [_table(s) for s in SECTIONS[kind](document)]
    figures = _figures(document, maps)
    body += figures
    return ("<!doctype html><html><head><meta charset='utf-8'><title>attnrewrite report</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>")


def _title(doc: dict) -> str:
    if doc.get("command") == "audit":
        return f"{doc['after']['path']} vs {doc['before']['path']}"
    return f"{doc['input']['path']} → {doc.get('output', '')}"


def _status(doc: dict) -> str:
    ok = doc.get("status") == "ok"
    budgets = "".join(f"<li class='{'ok' if b['passed'] else 'bad'}'>{html.escape(b['budget'])}: "
                      f"{'ok' if b['passed'] else html.escape(b.get('detail') or 'not met')}</li>"
                      for b in doc.get("budgets") or [])
    return f"<p class='{'ok' if ok else 'bad'}'>status: {html.escape(str(doc.get('status')))}</p><ul>{budgets}</ul>"


def _table(section: Section) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in section.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in section.rows)
    after = "".join(f"<p class='note'>{html.escape(line)}</p>" for line in section.after)
    return f"<h2>{html.escape(section.title)}</h2><table><tr>{head}</tr>{rows}</table>{after}"


def _figures(doc: dict, maps) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return ["<p class='note'>figures need matplotlib (pip install 'attnrewrite[report]')</p>"]
    matplotlib.use("Agg")
    out = []
    for title, fig in [*_drift_figures(doc), *_map_figures(maps)]:
        out.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{_png(fig)}'>")
    return out


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _drift_figures(doc: dict):
    """Per pass (or for the audit's paired sites): 1 − cosine per site, log scale, one bar per kind."""
    import matplotlib.pyplot as plt

    groups = []
    if doc.get("command") == "audit":
        if doc.get("sites"):
            groups.append(("per-site drift (AFTER vs BEFORE)", [s["id"] for s in doc["sites"]],
                           {"site output": [s.get("cosine") for s in doc["sites"]]}))
    for p in doc.get("passes", []):
        sites = [s for s in p["sites"] if s.get("local")]
        if not sites:
            continue
        kinds = {"local (same inputs)": [(s.get("local") or {}).get("cosine") for s in sites],
                 "accumulated (inside the rewritten model)": [(s.get("accumulated") or {}).get("cosine") for s in sites]}
        if any(s.get("sensitivity") for s in sites):
            kinds["alone (model output, only this site rewritten)"] = [(s.get("sensitivity") or {}).get("cosine")
                                                                       for s in sites]
        groups.append((f"per-site drift, pass {p['label']} (1 − cosine; reverted sites have no accumulated bar)",
                       [s["id"] for s in sites], kinds))
    for title, ids, kinds in groups:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(ids) * len(kinds)), 3.2))
        width = 0.8 / len(kinds)
        x = np.arange(len(ids))
        for i, (name, values) in enumerate(kinds.items()):
            drift = [max(1 - float(v), 1e-9) if isinstance(v, (int, float)) else np.nan for v in values]
            ax.bar(x + (i - (len(kinds) - 1) / 2) * width, drift, width, label=name)
        ax.set_yscale("log")
        ax.set_xticks(x, ids, rotation=45 if len(ids) > 8 else 0)
        ax.set_ylabel("1 − cosine")
        ax.legend(fontsize=8)
        yield title, fig


def _map_figures(maps):
    """One figure per site: for each query token, the weights before and after (head mean)."""
    import matplotlib.pyplot as plt

    for m in maps:
        q = len(m.queries)
        fig, axes = plt.subplots(q, 2, figsize=(7, 3.2 * q), squeeze=False)
        for row, token in enumerate(m.queries):
            for col, (name, weights) in enumerate((("before (softmax)", m.before[row]), (f"after ({m.label})", m.after[row]))):
                _draw(axes[row][col], m, token, weights, f"{name}, query token {token}")
        fig.suptitle(f"{m.site}: attention weights of a few queries (head mean)")
        fig.tight_layout()
        yield f"attention maps, {m.site} ({m.label})", fig


def _draw(ax, m, token: int, weights: np.ndarray, title: str) -> None:
    prefix = m.prefix
    if m.grid is not None and len(m.grid) == 2:
        h, w = m.grid
        grid = weights[prefix:prefix + h * w].reshape(h, w)
        if m.image is not None:
            ax.imshow(m.image, extent=(0, w, h, 0))
            ax.imshow(grid, extent=(0, w, h, 0), cmap="magma", alpha=0.6)
        else:
            ax.imshow(grid, extent=(0, w, h, 0), cmap="magma")
        if token >= prefix:
            y, x = divmod(token - prefix, w)
            ax.plot(x + 0.5, y + 0.5, marker="x", color="cyan", markersize=8)
        if prefix:
            title += f"\n(prefix keys: {weights[:prefix].sum():.2f} of the weight)"
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.bar(np.arange(weights.size), weights, width=1.0)
        ax.axvline(token, color="red", linewidth=0.8)
        ax.set_xlabel("key token")
    ax.set_title(title, fontsize=8)
