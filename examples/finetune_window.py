"""Win back, by fine-tuning, the accuracy a training-free rewrite cost (the torch front-end).

    python examples/finetune_window.py --out demo-ft                       # window:size=2x2 (~1.5 min, 2 cores)
    python examples/finetune_window.py --out demo-ft --pass linear:phi=fitted,dim=32

The digits ViT of `digits_vit.py` (trained here) is rewritten in torch (`attnrewrite.torch.rewrite`),
scored on the held-out split, then fine-tuned on the training split in two short stages: attention-output
distillation (each rewritten site's output pulled towards the original model's attention output for the
same images), then end to end (cross-entropy on the labels plus KL to the original's logits). The tuned
module is exported to ONNX and checked with `attnrewrite audit` against the original export, on the
held-out images. Prints one table: original, rewritten, fine-tuned (held-out top-1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_vit import attnrewrite_command, evaluate_onnx, load_digits_split, train_digits_vit  # noqa: E402

from attnrewrite import torch as art  # noqa: E402
from attnrewrite.torch.api import Recorder  # noqa: E402
from attnrewrite.torch.detect import detect  # noqa: E402


def accuracy(module, x, y) -> float:
    with torch.no_grad():
        return float((module(torch.as_tensor(x)).argmax(-1).numpy() == y).mean())


def site_outputs(teacher_gm, sites, x) -> dict[str, torch.Tensor]:
    """The original model's attention output at every site, for images `x`."""
    recorder = Recorder(teacher_gm, [s.output_node for s in sites])
    with torch.no_grad():
        recorder.run(torch.as_tensor(x))
    return {s.id: torch.as_tensor(recorder.values[s.output_node][0]) for s in sites}


def finetune(student, teacher, x, y, *, distill_steps: int, e2e_epochs: int, batch: int = 32, seed: int = 0) -> None:
    """Stage 1: the rewritten sites' outputs → the original's (MSE); stage 2: labels + the original's logits."""
    rng = np.random.default_rng(seed)
    teacher_gm = art.trace(teacher, (torch.as_tensor(x[:2]),))
    teacher_sites, _ = detect(teacher_gm)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in student.named_children():
        if name.startswith("attnrewrite_"):
            site_id = "_".join(name.split("_")[1:3])
            hooks.append(module.register_forward_hook(lambda m, i, o, site_id=site_id: captured.__setitem__(site_id, o)))
    student.train()
    optimiser = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=0.01)
    for _ in range(distill_steps):
        idx = rng.choice(len(x), batch, replace=False)
        want = site_outputs(teacher_gm, teacher_sites, x[idx])
        captured.clear()
        student(torch.as_tensor(x[idx]))
        loss = sum(F.mse_loss(captured[k], want[k]) for k in captured)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for h in hooks:
        h.remove()
    steps = e2e_epochs * (len(x) // batch)
    optimiser = torch.optim.AdamW(student.parameters(), lr=3e-4, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(steps, 1))
    for _ in range(steps):
        idx = rng.choice(len(x), batch, replace=False)
        xb = torch.as_tensor(x[idx])
        with torch.no_grad():
            soft = F.log_softmax(teacher(xb), -1)
        logits = student(xb)
        loss = F.cross_entropy(logits, torch.as_tensor(y[idx]), label_smoothing=0.05) + F.kl_div(
            F.log_softmax(logits, -1), soft, log_target=True, reduction="batchmean")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    student.eval()


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo-ft"))
    ap.add_argument("--pass", dest="spec", default="window:size=2x2")
    ap.add_argument("--train-epochs", type=int, default=12, help="epochs of the original digits ViT")
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=10, help="end-to-end fine-tuning epochs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    trained = train_digits_vit(args.out / "digits", epochs=args.train_epochs, seed=0, threads=args.threads)
    teacher, paths = trained["module"].eval(), trained["paths"]
    x_tr, x_te, y_tr, y_te = load_digits_split(0)
    student, report = art.rewrite(teacher, (torch.as_tensor(x_te[:1]),), [args.spec], calib=[(torch.as_tensor(x_tr[:64]),)])
    rows = [{"model": "original", "top1": accuracy(teacher, x_te, y_te)},
            {"model": f"{args.spec} (training-free)", "top1": accuracy(student, x_te, y_te),
             "sites": report["passes"][0]["rewritten"]}]
    start = time.perf_counter()
    finetune(student, teacher, x_tr, y_tr, distill_steps=args.distill_steps, e2e_epochs=args.epochs)
    rows.append({"model": f"{args.spec} + fine-tune", "top1": accuracy(student, x_te, y_te),
                 "seconds": round(time.perf_counter() - start, 1)})
    exported = art.export(student, (torch.as_tensor(x_te[:2]),), str(args.out / "finetuned.onnx"), input_names=["pixel_values"],
                          output_names=["logits"])
    rows[-1]["onnx_top1"] = evaluate_onnx(exported, paths["data"], paths["labels"])
    audit = subprocess.run([*attnrewrite_command(), "audit", str(paths["model"]), exported, "--calib", str(paths["data"]),
                            "--budget", "top1>=0", "--json"], capture_output=True, text=True)
    rows[-1]["audit_logit_cosine"] = json.loads(audit.stdout)["model_metrics"]["logits"]["cosine"] if audit.stdout else None
    print("\n| model | held-out top-1 | notes |\n| --- | --- | --- |")
    for r in rows:
        notes = {k: v for k, v in r.items() if k not in ("model", "top1")}
        print(f"| {r['model']} | {r['top1']:.4f} | {json.dumps(notes) if notes else ''} |")
    return rows


if __name__ == "__main__":
    main()
