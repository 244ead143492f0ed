"""Optimizers compared per epoch on real Fashion-MNIST: one sweep of tuned experiment presets.

Runs ``ngexp train -m +experiment=<presets> seed=<seeds> ...`` (one job per preset and seed),
then tabulates, per optimizer and epoch, the mean training loss over that epoch (the engine's
``train/loss`` with ``log_every`` = steps per epoch), the test metric at the end of the epoch and
the cumulative training wall time, as mean ± std over seeds. Writes a Markdown file with the
command, device and versions.

    python scripts/optimizer_study.py autoencoder      # SGD, Adam, K-FAC, EKFAC on the autoencoder
    python scripts/optimizer_study.py lenet5           # the same on LeNet-5 classification
    python scripts/optimizer_study.py vit --seeds 0,1,2 --epochs 2 --subset 20000   # small ViT
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from collections import defaultdict
from datetime import date, datetime
from pathlib import Path

import torch

STUDIES = {
    "autoencoder": {
        "presets": ["autoencoder_sgd", "autoencoder_adam", "autoencoder_kfac", "autoencoder_ekfac"],
        "metric": "test/loss",
        "title": "Deep autoencoder (784-1000-500-250-30, Martens & Grosse 2015 Sec. 13)",
        "loss": "summed binary cross-entropy per image",
    },
    "lenet5": {
        "presets": ["lenet5_sgd", "lenet5_kfac", "lenet5_ekfac"],
        "metric": "test/acc",
        "title": "LeNet-5 classification",
        "loss": "cross-entropy",
    },
    "vit": {
        "presets": ["vit_sgd", "vit_adam", "vit_kfac", "vit_ekfac"],
        "metric": "test/acc",
        "title": "small Vision Transformer (model=vit: 7x7 patches, dim 64, 3 blocks)",
        "loss": "cross-entropy",
    },
}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def per_epoch(run_dir: Path, metric: str) -> list[tuple[float, float, float]]:
    """(train loss over the epoch, test metric at its end, wall seconds so far) per epoch."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    tests = [r for r in records if metric in r]
    return [(t["train/loss"], e[metric], e["time"]) for t, e in zip(train, tests, strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=None, help="first N training images")
    parser.add_argument("--output-root", default="results/runs/optimizer_study")
    parser.add_argument("--out", default=None, help="default results/optimizers_<study>.md")
    args = parser.parse_args()
    study = STUDIES[args.study]
    examples = args.subset or 60000
    steps_per_epoch = examples // 128
    overrides = [f"+experiment={','.join(study['presets'])}", f"seed={args.seeds}",
                 f"trainer.epochs={args.epochs}", "trainer.batch_size=128",
                 f"trainer.log_every={steps_per_epoch}", "trainer.progress=none",
                 f"output_root={args.output_root}"]
    if args.subset:
        overrides.append(f"data.subset={args.subset}")
    command = ["ngexp", "train", "-m", *overrides]
    print(" ".join(command), flush=True)
    # this invocation's own sweep folder: two studies started in the same second (Hydra's
    # default folder name) would write their job pointers into one folder
    stamp = f"{datetime.now():%Y%m%d-%H%M%S-%f}"
    sweep_dir = Path(args.output_root) / "sweeps" / f"{args.study}-{stamp}"
    subprocess.run([sys.executable, "-m", "ngexp", "train", "-m", *overrides,
                    f"hydra.sweep.dir={sweep_dir}"], check=True)

    runs = [Path(p.read_text().strip()) for p in sweep_dir.rglob("run_dir.txt")]
    curves: dict[str, list[list[tuple[float, float, float]]]] = defaultdict(list)
    versions = {}
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        versions = summary["versions"]
        curves[summary["choices"]["optimizer"]].append(per_epoch(run, study["metric"]))

    metric = study["metric"]
    lines = [f"# Optimizers on Fashion-MNIST: {study['title']}", "",
             f"Command: `{' '.join(command)}` (or `python scripts/optimizer_study.py "
             f"{args.study} --seeds {args.seeds} --epochs {args.epochs}"
             f"{f' --subset {args.subset}' if args.subset else ''}`)  ",
             f"Device: CPU {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads; versions {versions}; {date.today()}  ",
             f"Training set: {examples} images; batch 128; seeds {args.seeds}; hyperparameters: "
             f"the presets `conf/experiment/{{{','.join(study['presets'])}}}.yaml`.  ",
             f"Cells: mean ± std over seeds of the training loss ({study['loss']}) averaged over "
             f"the epoch's minibatches / {metric} at the end of the epoch / training wall time "
             "so far (s).", ""]
    header = "| optimizer | " + " | ".join(f"epoch {e + 1}" for e in range(args.epochs)) + " |"
    lines += [header, "|---|" + "---|" * args.epochs]
    order = [preset.split("_", 1)[1] for preset in study["presets"]]  # e.g. "kfac"
    for optimizer in sorted(curves, key=lambda name: order.index(name) if name in order else 99):
        cells = []
        for epoch in range(args.epochs):
            rows = [curve[epoch] for curve in curves[optimizer] if len(curve) > epoch]
            if not rows:
                cells.append("-")
                continue
            cells.append(" / ".join(mean_std([row[i] for row in rows]) for i in range(3)))
        lines.append(f"| {optimizer} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out or f"results/optimizers_{args.study}.md").write_text(text)


if __name__ == "__main__":
    main()
