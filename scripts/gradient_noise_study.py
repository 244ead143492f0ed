"""The gradient noise scale across training, from runs with ``callbacks=[gradient_noise]``.

Reads the ``dynamics/grad/...`` records of completed run directories (any ``ngexp train`` runs
with the callback; results/dynamics_gradient_noise.md uses the alignment sweep's) and, per run
and per window of ``--window`` optimizer steps, pools the per-step unbiased estimates as
McCandlish et al. (2018, App. A) do before dividing:

    B_window = mean_t S_t / mean_t |G_t|^2      (S = tr(Sigma)^, |G|^2 unbiased, t in the window)

A window's ``|G|^2`` is *resolved* when its mean exceeds twice its standard error over the
window's measurements; otherwise only the one-sided bound ``B > mean S / (mean |G|^2 + 2 se)``
is reported (the true gradient is then too small to be told from zero with those examples).
Also per window: the mean training loss of the loss records in it and the mean per-example
gradient norm quantiles. Writes ``OUT/b_simple_windows.csv``, ``OUT/b_simple_windows.png``
and ``OUT/example_norms.png`` and prints the Markdown tables.

``--cost`` instead times the instrument: the median wall time of a plain SGD step (forward,
backward, update) and of the same step with the gradient probe armed and its statistics
computed, on random inputs of Fashion-MNIST's shape, for the MLP and LeNet-5 (batch 128) and
ResNet-20 (batch 32).

    python scripts/gradient_noise_study.py results/runs/dynamics_alignment \\
        --out results/dynamics_gradient_noise
    OMP_NUM_THREADS=1 python scripts/gradient_noise_study.py --cost
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ngexp.report.aggregate import series
from ngexp.report.scan import Run, find_run_dirs, load_run

GRAD = "dynamics/grad/"
QUANTILES = ("norm_q10", "norm_q50", "norm_q90")
NAMES = {"mlp": "MLP", "lenet5": "LeNet-5", "resnet20": "ResNet-20", "sgd": "SGD",
         "kfac": "K-FAC", "ekfac": "EKFAC", "adam": "Adam"}


def name(value: str) -> str:
    return NAMES.get(value, value)


def values_by_step(run: Run, metric: str) -> dict[int, float]:
    steps, values = series(run, metric, "step")
    return {int(s): float(v) for s, v in zip(steps, values, strict=True)}


def windows(run: Run, window: int) -> list[dict[str, float | int | str]]:
    """One row per window ``[k window + 1, (k + 1) window]`` of optimizer steps."""
    columns = {key: values_by_step(run, GRAD + key)
               for key in ("trace_sigma", "grad_sq", *QUANTILES)}
    loss = values_by_step(run, "train/loss")
    last = max(columns["trace_sigma"], default=0)
    rows = []
    for k in range(math.ceil(last / window)):
        first, end = k * window + 1, (k + 1) * window
        steps = [s for s in columns["trace_sigma"] if first <= s <= end]
        if len(steps) < 2:
            continue
        traces = [columns["trace_sigma"][s] for s in steps]
        squares = [columns["grad_sq"][s] for s in steps]
        trace, square = statistics.fmean(traces), statistics.fmean(squares)
        se = statistics.stdev(squares) / math.sqrt(len(squares))
        resolved = square > 2 * se
        losses = [v for s, v in loss.items() if first <= s <= end]
        row: dict[str, float | int | str] = {
            "first_step": first, "last_step": end, "measurements": len(steps),
            "trace_sigma": trace, "grad_sq": square, "grad_sq_se": se,
            "resolved": int(resolved),
            "b_simple": trace / square if resolved else math.nan,
            "b_simple_lower": trace / (square + 2 * se) if square + 2 * se > 0 else math.nan,
            "train_loss": statistics.fmean(losses) if losses else math.nan,
        }
        for q in QUANTILES:
            row[q] = statistics.fmean(columns[q][s] for s in steps)
        rows.append(row)
    return rows


def load(paths: Sequence[str], window: int) -> dict[tuple[str, str], list[tuple[int, list]]]:
    """(model, optimizer) -> [(seed, window rows)] of the completed runs with the callback."""
    groups: dict[tuple[str, str], list[tuple[int, list]]] = defaultdict(list)
    for path in find_run_dirs(paths):
        run = load_run(path)
        if not run.completed or not any(GRAD + "trace_sigma" in r for r in run.records):
            continue
        key = (run.choices.get("model", "?"), run.choices.get("optimizer", "?"))
        groups[key].append((run.seed if run.seed is not None else -1, windows(run, window)))
    for runs in groups.values():
        runs.sort(key=lambda item: item[0])
    return dict(sorted(groups.items()))


def mean_std(values: Sequence[float], digits: int = 0) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def b_cell(rows: Sequence[dict]) -> str:
    """Mean ± std over seeds when every seed's window is resolved, else each seed's value
    with ``>`` marking a lower bound (``?``: no bound, |G|^2 + 2 se <= 0)."""
    if all(r["resolved"] for r in rows):
        return mean_std([r["b_simple"] for r in rows])
    parts = [f"{r['b_simple']:.0f}" if r["resolved"]
             else (f">{r['b_simple_lower']:.0f}" if math.isfinite(r["b_simple_lower"]) else "?")
             for r in rows]
    return ", ".join(parts)


def tables(groups: dict[tuple[str, str], list[tuple[int, list]]]) -> str:
    lines = []
    count = min(len(rows) for runs in groups.values() for _, rows in runs)
    spans = [groups[next(iter(groups))][0][1][k] for k in range(count)]
    head = " | ".join(f"steps {w['first_step']}-{w['last_step']}" for w in spans)
    lines += ["B_simple per window (mean ± std over seeds when resolved in every seed; else each "
              "seed, `>`: lower bound), and the mean training loss in the window:", "",
              f"| model | optimizer | quantity | {head} |",
              "|---|---|---|" + "---:|" * count]
    for (model, optimizer), runs in groups.items():
        cells = [b_cell([rows[k] for _, rows in runs]) for k in range(count)]
        loss = [mean_std([rows[k]["train_loss"] for _, rows in runs], 3) for k in range(count)]
        lines.append(f"| {name(model)} | {name(optimizer)} | B_simple | " + " | ".join(cells)
                     + " |")
        lines.append("| | | train loss | " + " | ".join(loss) + " |")
    lines += ["", "Per-example gradient norm |G_n| quantiles (window mean, mean ± std over "
              "seeds), first and last window:", "",
              "| model | optimizer | q10 first | q50 first | q90 first | q10 last | q50 last | "
              "q90 last | q90/q50 last |", "|---|---|" + "---:|" * 7]
    for (model, optimizer), runs in groups.items():
        cells = []
        for k in (0, count - 1):
            for q in QUANTILES:
                values = [rows[k][q] for _, rows in runs]
                cells.append(f"{statistics.fmean(values):.3g} ± {statistics.stdev(values):.2g}"
                             if len(values) > 1 else f"{values[0]:.3g}")
        ratio = [rows[count - 1]["norm_q90"] / rows[count - 1]["norm_q50"] for _, rows in runs]
        cells.append(mean_std(ratio, 1))
        lines.append(f"| {name(model)} | {name(optimizer)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, groups: dict[tuple[str, str], list[tuple[int, list]]]) -> None:
    with path.open("w", newline="") as handle:
        writer = None
        for (model, optimizer), runs in groups.items():
            for seed, rows in runs:
                for row in rows:
                    record = {"model": model, "optimizer": optimizer, "seed": seed, **row}
                    if writer is None:
                        writer = csv.DictWriter(handle, fieldnames=list(record))
                        writer.writeheader()
                    writer.writerow({k: repr(v) if isinstance(v, float) else v
                                     for k, v in record.items()})


def figures(out: Path, groups: dict[tuple[str, str], list[tuple[int, list]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(model for model, _ in groups))
    optimizers = list(dict.fromkeys(optimizer for _, optimizer in groups))
    colors = {opt: plt.get_cmap("tab10")(i) for i, opt in enumerate(optimizers)}
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False,
                             layout="constrained")
    for ax, model in zip(axes[0], models, strict=True):
        loss_ax = ax.twinx()
        for optimizer in optimizers:
            runs = groups.get((model, optimizer))
            if not runs:
                continue
            color = colors[optimizer]
            for index, (_, rows) in enumerate(runs):
                mid = [(r["first_step"] + r["last_step"]) / 2 for r in rows]
                shown = [r["b_simple"] if r["resolved"] else r["b_simple_lower"] for r in rows]
                ax.plot(mid, shown, color=color, lw=1, alpha=0.7,
                        label=f"{name(optimizer)} B_simple" if index == 0 else None)
                for x, y, r in zip(mid, shown, rows, strict=True):
                    ax.plot(x, y, color=color, ls="none", marker="o" if r["resolved"] else "^",
                            mfc=color if r["resolved"] else "none", ms=5)
                loss_ax.plot(mid, [r["train_loss"] for r in rows], color=color, ls=":", lw=1,
                             label=f"{name(optimizer)} train loss" if index == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("B_simple per window (examples); ^: lower bound")
        loss_ax.set_ylabel("training loss (nats), dotted")
        ax.set_title(f"{name(model)}: B_simple per window, each seed")
        handles = ax.get_legend_handles_labels()
        extra = loss_ax.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper left")
    fig.savefig(out / "b_simple_windows.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False,
                             layout="constrained")
    styles = {"norm_q10": ":", "norm_q50": "-", "norm_q90": "--"}
    for ax, model in zip(axes[0], models, strict=True):
        for optimizer in optimizers:
            runs = groups.get((model, optimizer))
            if not runs:
                continue
            count = min(len(rows) for _, rows in runs)
            mid = [(r["first_step"] + r["last_step"]) / 2 for r in runs[0][1][:count]]
            for q, style in styles.items():
                mean = [statistics.fmean(rows[k][q] for _, rows in runs) for k in range(count)]
                ax.plot(mid, mean, color=colors[optimizer], ls=style, marker=".",
                        label=f"{name(optimizer)} {q.removeprefix('norm_')}")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("per-example gradient norm |G_n| (window mean over seeds)")
        ax.set_title(f"{name(model)}: quantiles q10 (dotted), q50, q90 (dashed)")
        ax.legend(fontsize=7, ncol=3, handlelength=3.5)
    fig.savefig(out / "example_norms.png", dpi=100)
    plt.close(fig)


def timed_step(model, optimizer, inputs, targets, probe=None) -> float:
    """Seconds of one SGD step (forward, cross-entropy, backward, update); with ``probe``, armed
    before the forward and its statistics computed after the backward."""
    import torch

    start = time.perf_counter()
    if probe is not None:
        probe.arm()
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    if probe is not None:
        from ngexp.instruments.gradients import gradient_metrics

        gradient_metrics(probe.read())
    optimizer.step()
    return time.perf_counter() - start


def cost(repeats: int = 30) -> str:
    """Median step times of plain SGD vs SGD with the armed gradient probe (module docstring)."""
    import torch

    from ngexp.data.spec import DataSpec
    from ngexp.instruments.gradients import GradientProbe
    from ngexp.models.lenet import LeNet5
    from ngexp.models.mlp import MLP
    from ngexp.models.resnet import cifar_resnet

    spec = DataSpec("fashion_mnist", (1, 28, 28), 10, mean=(0.2860,), std=(0.3530,))
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of "
             f"{repeats} steps after 5 warm-up steps", "",
             "| model | batch | SGD step (ms) | step + gradient_noise (ms) | extra, x SGD step |",
             "|---|---:|---:|---:|---:|"]
    for label, build, batch in (("MLP", lambda: MLP(spec), 128),
                                ("LeNet-5", lambda: LeNet5(spec), 128),
                                ("ResNet-20", lambda: cifar_resnet(spec, depth=20), 32)):
        torch.manual_seed(0)
        model = build()
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        inputs = torch.rand(batch, *spec.input_shape)
        targets = torch.randint(0, 10, (batch,))
        probe = GradientProbe(model)
        times: dict[bool, list[float]] = {False: [], True: []}
        for index in range(5 + repeats):  # interleaved, so load changes hit both alike
            for measure in (False, True):
                elapsed = timed_step(model, optimizer, inputs, targets, probe if measure else None)
                if index >= 5:
                    times[measure].append(elapsed)
        probe.remove()
        plain, measured = (statistics.median(times[m]) * 1e3 for m in (False, True))
        lines.append(f"| {label} | {batch} | {plain:.1f} | {measured:.1f} | "
                     f"{(measured - plain) / plain:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="run directories or any parent")
    parser.add_argument("--window", type=int, default=234, help="optimizer steps per window")
    parser.add_argument("--out", type=Path, help="folder for the CSV and figures")
    parser.add_argument("--cost", action="store_true", help="time the instrument instead")
    args = parser.parse_args(argv)
    if args.cost:
        print(cost())
        return 0
    if not args.paths:
        parser.error("give run directories, or --cost")
    groups = load(args.paths, args.window)
    if not groups:
        print("no completed run with dynamics/grad/ records", file=sys.stderr)
        return 1
    print(tables(groups))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(args.out / "b_simple_windows.csv", groups)
        figures(args.out, groups)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
