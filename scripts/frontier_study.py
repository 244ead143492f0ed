"""Optimizers tuned alike and judged by time to target: one command per workload.

For each optimizer, an Optuna sweep (``hydra/sweeper=optuna``, TPE, the same number of trials
for every optimizer, seed 0) over the same kind of space, learning rate(s), damping or epsilon
and batch size (:data:`SPACES`), each trial a run of the same training budget; then the best
setting of each optimizer trained with every seed; then ``ngexp report --target-from adam --score``:
per optimizer the steps, examples and seconds to reach the value of the tuning metric that
every seed of Adam reaches, and the performance profiles. Writes
``results/frontier_<workload>.md`` (command, device, versions, search spaces, best settings,
the report) and the report's files in ``results/frontier_<workload>/``.

    python scripts/frontier_study.py autoencoder      # about an hour on 2 CPU cores
    python scripts/frontier_study.py lenet5
    python scripts/frontier_study.py vit
    python scripts/frontier_study.py mlp --optimizers sgd,adam,kfac,ekfac,tonga,hessian_free
    python scripts/frontier_study.py autoencoder --trials 2 --subset 512 --epochs 1 \\
        --seeds 0,1 --optimizers adam,kfac,muon --out /tmp/frontier   # a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch
import yaml

from ngexp.cli import schema_of
from ngexp.config import option_names, register_all
from ngexp.options import REGISTRY

LR = "tag(log, interval({}, {}))"
#: Workload: the runs' fixed settings, the tuning objective, the presets that exist.
WORKLOADS = {
    "autoencoder": {
        "title": "Deep autoencoder (784-1000-500-250-30, Martens & Grosse 2015 Sec. 13)",
        "base": ["model=autoencoder", "data=fashion_mnist", "lr_schedule=cosine"],
        "objective": "train/loss",  # the K-FAC papers' measure: training loss
        "presets": {"sgd", "adam", "kfac", "ekfac"},
        # TONGA's step is about lr (1 - decay) g / |g|^2 while damping << |g|^2 / (1 - decay):
        # its length falls as 1/|g|, and the summed reconstruction loss has 5-10x LeNet-5's
        # gradient norms per layer (at initialization). In the space of the other workloads the
        # final loss fell monotonically with lr up to the bound (best trial: lr 2.5 of 3, 602
        # against 943 at the start), so here lr and damping are scaled 100x: lr / damping,
        # TONGA's SGD step on new gradient directions, keeps its range.
        "spaces": {"tonga": [f"optimizer.lr={LR.format(0.1, 300.0)}",
                             f"optimizer.damping={LR.format(1.0, 3000.0)}"]},
    },
    "vit": {
        "title": "small Vision Transformer (model=vit: 7x7 patches, dim 64, 3 blocks; 5000 "
                 "training images held out)",
        "base": ["model=vit", "data=fashion_mnist", "data.val_size=5000", "lr_schedule=cosine",
                 "trainer.eval_every=40"],  # val/loss 2-8 times an epoch: time-to-target resolution
        "objective": "val/loss",
        "presets": {"sgd", "adam", "kfac", "ekfac"},
    },
    "mlp": {
        "title": "MLP 784-512-256-10 (ReLU) on Fashion-MNIST (5000 training images held out)",
        "base": ["model=mlp", "data=fashion_mnist", "data.val_size=5000", "lr_schedule=cosine",
                 "trainer.eval_every=40"],
        "objective": "val/loss",
        "presets": set(),
    },
    "lenet5": {
        "title": "LeNet-5 on Fashion-MNIST (5000 training images held out for validation)",
        "base": ["model=lenet5", "data=fashion_mnist", "data.val_size=5000",
                 "lr_schedule=cosine", "trainer.eval_every=40"],
        "objective": "val/loss",
        "presets": {"sgd", "adam", "kfac", "ekfac"},
    },
}
BATCH = "trainer.batch_size=choice(64,128,256)"
#: The search space of each optimizer: its step size(s), its damping or epsilon, the batch.
SPACES = {
    "sgd": [f"optimizer.lr={LR.format(1e-3, 1.0)}", "optimizer.momentum=interval(0.0, 0.99)"],
    "adam": [f"optimizer.lr={LR.format(1e-5, 1e-1)}", f"optimizer.eps={LR.format(1e-10, 1e-3)}"],
    "kfac": [f"optimizer.lr={LR.format(1e-4, 1.0)}",
             f"optimizer.damping={LR.format(1e-5, 1e-1)}"],
    "ekfac": [f"optimizer.lr={LR.format(1e-4, 1.0)}",
              f"optimizer.damping={LR.format(1e-5, 1e-1)}"],
    "shampoo": [f"optimizer.lr={LR.format(1e-5, 1e-1)}",
                f"optimizer.eps={LR.format(1e-12, 1e-4)}"],
    "soap": [f"optimizer.lr={LR.format(1e-5, 1e-1)}", f"optimizer.eps={LR.format(1e-10, 1e-3)}"],
    "muon": [f"optimizer.lr={LR.format(1e-3, 0.3)}", f"optimizer.adam_lr={LR.format(1e-5, 1e-1)}"],
    # the seed papers' methods (issue 22): TONGA on SGD, Hessian-free's CG step (lr 1 as
    # published, so the search scales it down at most 10x) with its initial LM damping
    "tonga": [f"optimizer.lr={LR.format(1e-3, 3.0)}",
              f"optimizer.damping={LR.format(1e-2, 30.0)}"],
    "hessian_free": [f"optimizer.lr={LR.format(0.1, 1.0)}",
                     f"optimizer.damping={LR.format(1e-3, 10.0)}"],
}


def ngexp(args: list[str]) -> None:
    print("ngexp " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([sys.executable, "-m", "ngexp", *args], check=True)


def fixed(workload: dict, optimizer: str, args: argparse.Namespace) -> list[str]:
    """The settings every run of ``optimizer`` shares: the workload's preset for it when one
    exists (K-FAC's statistics and inverse frequencies, KL clipping), the training budget."""
    name = f"{args.workload}_{optimizer}"
    choice = ([f"+experiment={name}"] if optimizer in workload["presets"]
              else [f"optimizer={optimizer}"])
    budget = [f"trainer.epochs={args.epochs}", "trainer.progress=none",
              "trainer.log_every=10",  # train/ records every 10 steps: time-to-target resolution
              f"objective={workload['objective']}"]
    return [*workload["base"], *choice, *budget,
            *([f"data.subset={args.subset}"] if args.subset else [])]


def space(workload: dict, optimizer: str, given: dict[str, list[str]] | None = None) -> list[str]:
    """The search space of ``optimizer`` on ``workload``: ``--space``, else :data:`SPACES`
    unless the workload rescales it (its ``spaces``, each with the measurement that asked for
    it), else -- an optimizer of a plugin -- :func:`default_space`."""
    if given and optimizer in given:
        return given[optimizer]
    if optimizer in SPACES:
        return workload.get("spaces", {}).get(optimizer, SPACES[optimizer])
    return default_space(optimizer)


def default_space(optimizer: str) -> list[str]:
    """``optimizer.lr`` on a log scale from 1/30 to 30 times its default: the space of an
    optimizer ngexp has no space for (a plugin's), when ``--space`` gives none."""
    register_all()
    schema = schema_of("optimizer", optimizer) or optimizer
    lr = next((o.default for o in REGISTRY["optimizer"][schema].options() if o.name == "lr"),
              None)
    if not isinstance(lr, (int, float)) or lr <= 0:
        sys.exit(f"frontier_study: optimizer={optimizer} has no lr default to search around; "
                 f"give its space: --space '{optimizer}=optimizer.KEY=SPACE[;...]'")
    return [f"optimizer.lr={LR.format(f'{lr / 30:.3g}', f'{lr * 30:.3g}')}"]


def parse_spaces(values: list[str]) -> dict[str, list[str]]:
    """``--space 'lion=optimizer.lr=tag(log, interval(1e-5, 1e-2));optimizer.beta1=...'``."""
    found = {}
    for value in values:
        name, _, overrides = value.partition("=")
        found[name] = [o.strip() for o in overrides.split(";") if o.strip()]
    return found


def tune(workload: dict, optimizer: str, args: argparse.Namespace, root: Path) -> dict:
    """The Optuna sweep of ``optimizer``; its best parameters."""
    sweep_dir = root / "tune" / optimizer / "sweep"
    ngexp(["train", "-m", "hydra/sweeper=optuna", f"hydra.sweeper.n_trials={args.trials}",
           "hydra.sweeper.direction=minimize", "hydra.sweeper.sampler.seed=0",
           f"hydra.sweep.dir={sweep_dir}", *fixed(workload, optimizer, args),
           *space(workload, optimizer, args.space), BATCH, "seed=0",
           f"output_root={root / 'tune'}"])
    return yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--optimizers", default=",".join(SPACES),
                        help="comma-separated options of the optimizer group (a plugin's too); "
                             "adam is the target's baseline and must be one")
    parser.add_argument("--space", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="search space of an optimizer, overrides separated by ';' (default "
                             "for one without a space here: its lr, 1/30 to 30x its default)")
    parser.add_argument("--trials", type=int, default=6, help="Optuna trials per optimizer")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of each best setting")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=10000, help="first N training images")
    parser.add_argument("--output-root", default="results/runs/frontier")
    parser.add_argument("--out", default="results", help="folder of frontier_<workload>.md")
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    optimizers = args.optimizers.split(",")
    args.space = parse_spaces(args.space)
    register_all()
    unknown = sorted(set(optimizers) - set(option_names("optimizer")))
    if unknown or "adam" not in optimizers:
        parser.error(f"--optimizers: {','.join(unknown) or 'adam missing'}; choices: "
                     + ", ".join(option_names("optimizer")))
    root = Path(args.output_root) / args.workload
    best = {opt: tune(workload, opt, args, root) for opt in optimizers}
    for opt, found in best.items():
        settings = [f"{key}={value}" for key, value in found["best_params"].items()]
        ngexp(["train", "-m", *fixed(workload, opt, args), *settings, f"seed={args.seeds}",
               f"output_root={root / 'final'}"])
    out = Path(args.out)
    report_dir = out / f"frontier_{args.workload}"
    ngexp(["report", str(root / "final"), "--by", "optimizer", "--metric",
           workload["objective"], "--target-from", "adam", "--score", "--out", str(report_dir)])

    command = "python scripts/frontier_study.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    lines = [f"# Tuned alike, judged by time to target: {workload['title']}", "",
             f"Command: `{command}` ({date.today()})  ",
             f"Device: CPU {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; torch {torch.__version__}  ",
             f"Budget: {args.trials} Optuna trials (TPE, seed 0) per optimizer, each "
             f"{args.epochs} epochs on {args.subset or 'all'} training images, minimizing the "
             f"final `{workload['objective']}`; then seeds {args.seeds} of each best setting.",
             "", "| optimizer | search space (plus trainer.batch_size in 64, 128, 256) "
             "| best setting | best trial's objective |", "|---|---|---|---|"]
    for opt, found in best.items():
        searched = "; ".join(f"`{s}`" for s in space(workload, opt, args.space))
        setting = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in found["best_params"].items())
        lines.append(f"| {opt} | {searched} | {setting} | {found['best_value']:.4g} |")
    report = (report_dir / "report.md").read_text().replace("](", f"](frontier_{args.workload}/")
    text = "\n".join(lines) + "\n\n" + report.replace("# ngexp report", "## Seeds of the best "
                                                                          "settings", 1)
    (out / f"frontier_{args.workload}.md").write_text(text)
    print(out / f"frontier_{args.workload}.md")


if __name__ == "__main__":
    main()
