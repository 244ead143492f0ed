"""Per-step cost of K-FAC, EKFAC and natural gradient relative to SGD on the same model and batch.

All optimizers are measured in one process, on copies of one initialized model fed the same
batches, with rounds interleaved (SGD, K-FAC, EKFAC, NG, SGD, ...) so that machine load hits them
alike. A round is a window of ``--inv-update-freq`` steps for SGD, K-FAC and EKFAC, so it holds
exactly one eigendecomposition and ``inv/cov`` statistics steps (the periodic work is amortized
by its frequency), and ``--ng-steps`` steps for natural gradient (no periodic work). The round
with the median total per-step time is reported, after ``--warmup-steps`` untimed steps.

Each step is timed in segments (with ``torch.cuda.synchronize()`` at every boundary on a GPU):
forward + backward (``optimizer.backward`` for the second-order methods: curvature hooks, the
extra Monte-Carlo backward) and ``optimizer.step``, inside which the Kronecker optimizers'
factor averaging and EKFAC's scaling update (``_update_factors``, ``_update_scaling``) and the
batched ``eigh`` (``_update_bases``) are timed as well. The extra cost over SGD is split as

    statistics      = (forward+backward - SGD's) + factor / scaling updates in step
    decomposition   = eigendecompositions (amortized over inv_update_freq steps)
    preconditioning = rest of step - SGD's step (for natural gradient: the CG solve)

so ``total / sgd = 1 + (statistics + decomposition + preconditioning) / sgd``.

    python scripts/bench_optim.py    # with CUDA: VGG-16 and preact ResNet-18 on random data of
                                     # CIFAR-10 shapes -> results/bench_optim_gpu.md; without:
                                     # MLP and LeNet-5 on Fashion-MNIST -> bench_optim_cpu.md
    python scripts/bench_optim.py --device cpu --data synthetic_cifar --models preact_resnet18
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from ngexp.optim.base import ModelOptimizer
from ngexp.train.tasks import Task, build_task
from torch import Tensor, nn

from ngexp.config import register_all
from ngexp.data.bundle import DataBundle
from ngexp.models import build_model
from ngexp.optim import build_optimizer

CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIMIZERS = ("sgd", "kfac", "ekfac", "natural_gradient")
#: Methods of the Kronecker optimizers timed inside ``step``, by the phase they belong to.
PHASE_METHODS = {"_update_factors": "statistics", "_update_scaling": "statistics",
                 "_update_bases": "decomposition"}
CPU_MODELS = ("mlp", "lenet5")
GPU_MODELS = ("vgg16", "preact_resnet18")
#: Data overrides by ``--data``: real Fashion-MNIST, or random tensors of CIFAR-10 shapes.
DATA = {"fashion_mnist": ["data=fashion_mnist"],
        "synthetic_cifar": ["data=synthetic", "data.shape=[3,32,32]", "data.num_train=5120"]}


class SegmentTimer:
    """Wall time per named segment, summed; synchronizes CUDA around each segment."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.totals[name] += time.perf_counter() - start

    def instrument(self, obj: Any, method: str, name: str) -> None:
        """Time every call of ``obj.method`` as segment ``name`` (instance attribute shadowing)."""
        original: Callable[..., Any] = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(name):
                return original(*args, **kwargs)

        setattr(obj, method, timed)


@dataclass
class Contender:
    """One optimizer on its own copy of the model, with its timings per round (ms per step)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    timer: SegmentTimer
    window: int
    rounds: list[dict[str, float]] = field(default_factory=list)
    cg_iters: list[float] = field(default_factory=list)


def compose_config(overrides: list[str]) -> Any:
    with initialize_config_dir(str(CONF), version_base=None):
        return compose("train", overrides=overrides)


def batches(data: DataBundle, batch_size: int, seed: int) -> Callable[[int], tuple[Tensor, Tensor]]:
    """Batch ``i`` of a fixed random order of the training split (the same for every optimizer)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train), generator=generator).to(data.train.inputs.device)
    per_epoch = len(order) // batch_size

    def batch(i: int) -> tuple[Tensor, Tensor]:
        index = order[(i % per_epoch) * batch_size:(i % per_epoch + 1) * batch_size]
        return data.train.inputs[index], data.train.targets[index]

    return batch


def run_steps(contender: Contender, task: Task, batch: Callable[[int], tuple[Tensor, Tensor]],
              start: int, steps: int) -> dict[str, float]:
    """Train ``steps`` steps from step index ``start``; ms per step by segment."""
    model, optimizer, timer = contender.model, contender.optimizer, contender.timer
    timer.totals.clear()
    for i in range(start, start + steps):
        inputs, targets = batch(i)
        with timer("forward_backward"):
            optimizer.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = task.loss(outputs, targets)
            if isinstance(optimizer, ModelOptimizer):
                optimizer.backward(loss, outputs=outputs, inputs=inputs, task=task)
            else:
                loss.backward()
        with timer("step"):
            optimizer.step()
        if contender.name == "natural_gradient":
            contender.cg_iters.append(optimizer.log_metrics()["cg_iters"])
    return {name: 1e3 * total / steps for name, total in timer.totals.items()}


def state_megabytes(optimizer: torch.optim.Optimizer) -> float:
    """Size of the tensors in the optimizer's state dict (moments, factors, bases, CG solution)."""

    def size(value: Any) -> int:
        if isinstance(value, Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0

    return size(optimizer.state_dict()["state"]) / 2**20


def bench_model(model_name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    base = [f"model={model_name}", *DATA[args.data], f"trainer.device={device.type}",
            f"seed={args.seed}"]
    cfg = compose_config(base)
    torch.manual_seed(args.seed)
    data = instantiate(cfg.data, _partial_=True)().to(device)
    template = build_model(cfg.model, data.spec).to(device)
    task = build_task(getattr(template, "task", data.spec.task))
    batch = batches(data, args.batch_size, args.seed)
    freqs = [f"optimizer.cov_update_freq={args.cov_update_freq}",
             f"optimizer.inv_update_freq={args.inv_update_freq}"]
    contenders = []
    for name in args.optimizers:
        overrides = [f"optimizer={name}", *(freqs if name in ("kfac", "ekfac") else [])]
        model = copy.deepcopy(template)
        optimizer = build_optimizer(compose_config(base + overrides).optimizer, model)
        timer = SegmentTimer(device)
        for method, phase in PHASE_METHODS.items():
            if hasattr(optimizer, method):
                timer.instrument(optimizer, method, phase)
        window = args.ng_steps if name == "natural_gradient" else args.inv_update_freq
        contenders.append(Contender(name, model, optimizer, timer, window))

    peaks: dict[str, list[float]] = defaultdict(list)
    for contender in contenders:
        run_steps(contender, task, batch, 0, args.warmup_steps)
        contender.cg_iters.clear()
    for round_index in range(args.rounds):
        for contender in contenders:
            start = args.warmup_steps + round_index * contender.window
            if device.type == "cuda":
                torch.cuda.synchronize()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            contender.rounds.append(run_steps(contender, task, batch, start, contender.window))
            if device.type == "cuda":
                peaks[contender.name].append((torch.cuda.max_memory_allocated() - resident) / 2**20)
    rows = [summarize(c, model_name, peaks.get(c.name)) for c in contenders]
    sgd = next((r for r in rows if r["optimizer"] == "sgd"), None)
    if sgd is not None:  # extra cost over SGD, also in units of SGD's step time
        for row in rows:
            row["statistics"] += row["forward_backward"] - sgd["forward_backward"]
            row["preconditioning"] = row["step_rest"] - sgd["step_rest"]
            for key in ("total", "statistics", "decomposition", "preconditioning"):
                row[f"{key}_x"] = row[key] / sgd["total"]
    return rows


def summarize(contender: Contender, model_name: str, peaks: list[float] | None) -> dict:
    """The median round (by total ms per step), its segments, and the state size."""
    totals = [r["forward_backward"] + r["step"] for r in contender.rounds]
    median_round = contender.rounds[totals.index(statistics.median_low(totals))]
    in_step = {phase: median_round.get(phase, 0.0) for phase in ("statistics", "decomposition")}
    step_rest = median_round["step"] - sum(in_step.values())
    row = {"model": model_name, "optimizer": contender.name,
           "forward_backward": median_round["forward_backward"], "step": median_round["step"],
           "total": median_round["forward_backward"] + median_round["step"],
           "statistics": in_step["statistics"], "decomposition": in_step["decomposition"],
           "step_rest": step_rest,
           "state_mb": state_megabytes(contender.optimizer),
           "peak_mb": statistics.median(peaks) if peaks else None,
           "rounds_total_ms": totals}
    if contender.cg_iters:
        row["cg_iters"] = statistics.fmean(contender.cg_iters)
    return row


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    return f"{model_name} ({os.cpu_count()} logical CPUs), {torch.get_num_threads()} torch threads"


def cell(row: dict, key: str) -> str:
    """``ms (+x SGD)`` of one phase, or just ms without an SGD row."""
    ratio = f" ({row[f'{key}_x']:+.2f})" if f"{key}_x" in row else ""
    return f"{row[key]:.2f}{ratio}"


def markdown(rows: list[dict], args: argparse.Namespace, device: torch.device,
             command: str, load_start: float) -> str:
    gpu = device.type == "cuda"
    lines = [
        "# Optimizer step cost relative to SGD",
        "",
        f"Command: `{command}`  ",
        f"Device: {device_description(device)}; torch {torch.__version__}; "
        f"python {platform.python_version()}; {date.today()}  ",
        f"1-min load average of the machine: {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (interleaved rounds spread other jobs' load "
        "over all optimizers alike).  ",
        f"Data {args.data}; batch {args.batch_size}; "
        f"K-FAC/EKFAC cov_update_freq={args.cov_update_freq}, "
        f"inv_update_freq={args.inv_update_freq}; other options from conf/optimizer/*.yaml. "
        f"{args.warmup_steps} warm-up steps, then the median of {args.rounds} interleaved rounds "
        f"({args.inv_update_freq} steps each; natural gradient: {args.ng_steps}).  ",
        "Columns are ms per step; in parentheses, in units of SGD's total step time, so "
        "x SGD = 1 + statistics + decomposition + preconditioning "
        "(see the docstring of scripts/bench_optim.py).",
        "",
        "| model | optimizer | total ms | x SGD | statistics | decomposition | preconditioning "
        f"| state MB |{' step peak MB |' if gpu else ''} notes |",
        f"|---|---|---:|---:|---:|---:|---:|---:|{'---:|' if gpu else ''}---|",
    ]
    for r in rows:
        stats, decomposition, preconditioning = (
            cell(r, key) for key in ("statistics", "decomposition", "preconditioning"))
        note = f"mean CG iterations {r['cg_iters']:.1f}" if "cg_iters" in r else ""
        peak = f" {r['peak_mb']:.0f} |" if gpu else ""
        ratio = f"{r['total_x']:.2f}x" if "total_x" in r else ""
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['total']:.2f} | {ratio} | "
                     f"{stats} | {decomposition} | {preconditioning} | {r['state_mb']:.2f} |"
                     f"{peak} {note} |")
    lines += ["", "Ratios:", ""]
    lines += [f"- {r['model']}: {r['optimizer']} / sgd = {r['total_x']:.2f}x"
              for r in rows if "total_x" in r and r["optimizer"] != "sgd"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"default: {' '.join(CPU_MODELS)} on CPU, "
                             f"{' '.join(GPU_MODELS)} on CUDA")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--data", default=None, choices=tuple(DATA),
                        help="default: fashion_mnist on CPU, synthetic_cifar on CUDA")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--cov-update-freq", type=int, default=10)
    parser.add_argument("--inv-update-freq", type=int, default=100)
    parser.add_argument("--ng-steps", type=int, default=10, help="steps per natural-gradient round")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 is the steadiest on a "
                             "shared CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="markdown file; default results/bench_optim_{cpu,gpu}.md")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = args.models or list(GPU_MODELS if gpu else CPU_MODELS)
    args.data = args.data or ("synthetic_cifar" if gpu else "fashion_mnist")
    register_all()
    load_start = os.getloadavg()[0]
    rows = [row for name in models for row in bench_model(name, args, device)]
    command = " ".join(["python scripts/bench_optim.py", *sys.argv[1:]])
    text = markdown(rows, args, device, command.strip(), load_start)
    print(text)
    out = Path(args.out or f"results/bench_optim_{'gpu' if gpu else 'cpu'}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
