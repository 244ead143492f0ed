"""Variational pruning against magnitude/Taylor filter pruning on Fashion-MNIST (issue 22, item 4).

Two studies, each over seeds, every run an ordinary ``ngexp train`` run directory (finished runs
are skipped when the script runs again):

1. *Level and accuracy*: LeNet-5 and a small VGG (``vgg11_bn``) trained with
   ``prune=variational_bernoulli`` and ``prune=spike_and_slab``; then, for each, the same model
   pruned by ``prune=filter`` (criteria ``magnitude`` and ``taylor1``, one-shot before the last
   fine-tuning epoch) to the *same* fraction of output channels the variational run removed.
   Reported: channel sparsity, parameters, FLOPs, test accuracy (mean +- std over seeds).
2. *Robustness* (the seed abstract's claim): ``variational_bernoulli`` on LeNet-5 from initial
   weights scaled by 0.5, 1 and 2 (``init_from`` files written here), and on MLPs of starting
   widths [300, 100], [600, 200], [1200, 400]: the final pruning level and accuracy should not
   depend on them (LeNet-5 and VGG have no width option; the MLP stands in for widths).

Writes a Markdown file with the commands, device and versions.

    python scripts/variational_prune_study.py                      # the full study (GPU-scale)
    python scripts/variational_prune_study.py --subset 10000 --epochs 5 --vgg-width 0.25  # CPU
    python scripts/variational_prune_study.py --tiny               # a smoke run of every path
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("variational_bernoulli", "spike_and_slab")
BASELINES = ("magnitude", "taylor1")
#: ``nonzero_params``: remaining parameters, whether removed (variational) or masked (filter).
KEYS = ("prune/channel_sparsity", "prune/units_alive", "prune/nonzero_params", "prune/flops",
        "test/acc")


def train(overrides: list[str], output_root: Path, threads: int) -> dict[str, float]:
    """Run ``ngexp train OVERRIDES`` and return the final metrics of its summary."""
    command = [sys.executable, "-m", "ngexp", "train", *overrides, "trainer.progress=none",
               f"output_root={output_root}"]
    print("$", " ".join(command[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True,
                            text=True)
    run_dir = Path(next(line.split("run dir: ", 1)[1] for line in result.stdout.splitlines()
                        if line.startswith("run dir: ")))
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary["final"], "_device": summary["device"],
            "_versions": json.dumps(summary["versions"])}


def scaled_init(model: list[str], scale: float, seed: int, folder: Path) -> Path:
    """A checkpoint file of the model's initial weights (seed ``seed``) times ``scale``, for
    ``init_from``."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ngexp.config import register_all
    from ngexp.hydra_compat import VERSION_BASE
    from ngexp.models import build_model

    path = folder / f"init_{'_'.join(model).replace('=', '-')}_x{scale}_seed{seed}.pt"
    if not path.exists():
        register_all()
        with initialize_config_dir(str(REPO / "conf"), **VERSION_BASE):
            cfg = compose("train", overrides=[*model, f"seed={seed}"])
        torch.manual_seed(seed)
        net = build_model(cfg.model, instantiate(cfg.data, _partial_=True)().spec)
        state = {key: value * scale if key.endswith("weight") and value.dim() > 1 else value
                 for key, value in net.state_dict().items()}
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state}, path)
    return path


def mean_std(values: list[float | None], percent: bool = False) -> str:
    """``mean ± std``; ``—`` where a run does not report the metric."""
    if any(v is None for v in values):
        return "—"
    scale = 100 if percent else 1
    mean = statistics.fmean(values) * scale
    spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {spread:.2f}" if percent else f"{mean:,.0f} ± {spread:,.0f}"


def row(label: str, runs: list[dict[str, float]]) -> str:
    cells = [mean_std([r.get(k) for r in runs],
                      percent=k in ("prune/channel_sparsity", "test/acc")) for k in KEYS]
    return f"| {label} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--subset", type=int, default=None, help="first N training images")
    parser.add_argument("--vgg-width", type=float, default=1.0,
                        help="model.width of the VGG (0.25: a small VGG for CPU-scale runs)")
    parser.add_argument("--tiny", action="store_true",
                        help="a smoke run: 1 seed, 512 examples, a few steps, LeNet-5 and MLP")
    parser.add_argument("--output-root", type=Path, default=REPO / "results" / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "variational_pruning.md")
    args = parser.parse_args(argv)
    budget = [f"trainer.epochs={args.epochs}",
              *([f"data.subset={args.subset}"] if args.subset else [])]
    models = {"LeNet-5": ["model=lenet5"],
              f"VGG-11-BN x{args.vgg_width:g}": ["model=vgg11_bn", f"model.width={args.vgg_width}"]}
    scales, widths = (0.5, 1.0, 2.0), ([300, 100], [600, 200], [1200, 400])
    if args.tiny:
        args.seeds = args.seeds[:1]
        budget = ["data.subset=512", "trainer.epochs=2", "trainer.batch_size=64",
                  "prune.fix_every=4"]
        models = {"LeNet-5": ["model=lenet5"]}
        scales, widths = (0.5, 2.0), ([32, 16], [64, 32])
    base_budget = [b for b in budget if not b.startswith("prune.")]
    lines = [f"# Variational pruning on Fashion-MNIST ({date.today()})", "",
             f"Command: `python scripts/variational_prune_study.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    header = ["| run | channel sparsity (%) | units left | nonzero parameters | FLOPs / example | "
              "test acc (%) |", "|---|---|---|---|---|---|"]
    environment: dict[str, str] = {}

    # 1. level and accuracy against filter pruning at the same structured sparsity
    lines += ["## Pruning level and accuracy", "", *header]
    for model_name, model in models.items():
        for method in METHODS:
            runs: dict[str, list[dict[str, float]]] = defaultdict(list)
            for seed in args.seeds:
                variational = train([*model, f"prune={method}", *budget, f"seed={seed}"],
                                    args.output_root, args.threads)
                environment = {"device": variational["_device"],
                               "versions": variational["_versions"]}
                runs[method].append(variational)
                target = max(min(variational["prune/channel_sparsity"], 0.99), 0.01)
                for criterion in BASELINES:
                    runs[criterion].append(train(
                        [*model, "prune=filter", f"prune.criterion={criterion}",
                         f"prune.target_sparsity={target:.4f}", *base_budget, f"seed={seed}"],
                        args.output_root, args.threads))
            for name, found in runs.items():
                label = name if name == method else f"filter {name} at {method}'s sparsity"
                lines.append(row(f"{model_name}: {label}", found))

    # 2. robustness to the initial weight scale and the starting width
    lines += ["", "## The same pruning level across initialization scales and widths", "",
              *header]
    for scale in scales:
        runs_scaled = []
        for seed in args.seeds:
            init = scaled_init(["model=lenet5"], scale, seed, args.output_root / "inits")
            runs_scaled.append(train(["model=lenet5", "prune=variational_bernoulli", *budget,
                                      f"init_from={init}", f"seed={seed}"],
                                     args.output_root, args.threads))
        lines.append(row(f"LeNet-5, initial weights x{scale}", runs_scaled))
    for width in widths:
        runs_wide = [train(["model=mlp", f"model.widths=[{width[0]},{width[1]}]",
                            "prune=variational_bernoulli", *budget, f"seed={seed}"],
                           args.output_root, args.threads) for seed in args.seeds]
        lines.append(row(f"MLP {width}", runs_wide))

    lines += ["", f"Device: {environment.get('device')}; versions: "
              f"{environment.get('versions')}; seeds {args.seeds}.", ""]
    if args.tiny:
        lines.insert(2, "**A smoke run on a tiny budget: these numbers test nothing.**\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
