"""Training-step cost of ngexp's LSTM family (model=lstm, bnlstm, lstm_bn_input) against
``torch.nn.LSTM`` with a linear head of the same sizes, on sequences of the paper's lengths.

A training step is forward + cross-entropy + backward + RMSProp step (lr 1e-3, decay 0.9) on one
random batch (``--batch-size`` 128 sequences, ``--hidden`` 100 units, 10 classes). Lengths:
T=28 (row by row, 28 features), 196 (14x14 pixel by pixel) and 784 (28x28 pixel by pixel),
each with 1 and 2 torch threads. ngexp's models come from their presets
(``conf/model/<name>.yaml``) through the model builder. Per thread count, every (T, model)
steps once per round, in turn, so drifting machine load hits all of them alike (the ratios
between models and between lengths). After ``--warmup`` untimed rounds, rounds run until
``--budget`` seconds have passed (at least ``--min-rounds``); the median step time of each
(T, model) is reported and divided by ``torch.nn.LSTM``'s at that T.

Memory: the bytes autograd saves for the backward in one training forward (distinct storages
seen by ``torch.autograd.graph.saved_tensors_hooks``), i.e. the activation memory on top of
parameters and optimizer state, at the longest T; on a CUDA device also the peak of allocated
device memory during one training step.

``--device cuda`` runs every contender on the GPU, where ``torch.nn.LSTM`` is cuDNN's fused
LSTM (the thread counts then only label the rows: use ``--threads 1``); each step ends with
``torch.cuda.synchronize()`` so the time is the device's.

    python scripts/bench_sequences.py --out results/bench_sequences_cpu.md
    python scripts/bench_sequences.py --device cuda --threads 1 --out results/bench_sequences_gpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import Tensor, nn

from ngexp.config import register_all
from ngexp.data.spec import DataSpec
from ngexp.hydra_compat import VERSION_BASE
from ngexp.models import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"
TORCH = "torch.nn.LSTM"
MODELS = ("lstm", "bnlstm", "lstm_bn_input")
#: Sequence shape (T, D) by length: rows of 28x28 images, pixels of 14x14 and of 28x28 images.
SHAPES = {28: (28, 28), 196: (196, 1), 784: (784, 1)}
CLASSES = 10
#: Targets at the longest T: ratio to torch.nn.LSTM by model, and the time ratio of the longest
#: to the second-longest T over their length ratio (784 / 196: at most 4.5).
TARGETS = {"lstm": 2.0, "bnlstm": 3.0}
SCALING_SLACK = 1.125


class TorchLSTM(nn.Module):
    """``torch.nn.LSTM`` (one layer) and a linear head on the last hidden state."""

    def __init__(self, input_size: int, hidden_size: int, classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


@dataclass
class Contender:
    name: str
    steps: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: Tensor
    y: Tensor
    times: list[float] = field(default_factory=list)

    def step(self) -> float:
        """One timed training step on the contender's batch (finished on the device);
        seconds."""
        start = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.x.is_cuda:
            torch.cuda.synchronize(self.x.device)
        return time.perf_counter() - start

    def peak_megabytes(self) -> float:
        """MiB of device memory allocated at the peak of one training step (CUDA)."""
        torch.cuda.synchronize(self.x.device)
        torch.cuda.reset_peak_memory_stats(self.x.device)
        self.step()
        return torch.cuda.max_memory_allocated(self.x.device) / 2**20


def build(name: str, shape: tuple[int, int], hidden: int) -> nn.Module:
    """``torch.nn.LSTM`` + head, or ngexp's ``model=name`` preset for sequences of ``shape``."""
    if name == TORCH:
        return TorchLSTM(shape[1], hidden, CLASSES)
    with initialize_config_dir(str(CONF), **VERSION_BASE):  # the model group on its own
        cfg = compose(f"model/{name}", overrides=[f"model.hidden_size={hidden}"])
    return build_model(cfg.model, DataSpec(f"sequences{shape[0]}", shape, CLASSES))


def contenders(names: list[str], lengths: list[int], args: argparse.Namespace) -> list[Contender]:
    """Every model at every length, each with one random batch (the same for all models)."""
    found = []
    device = torch.device(args.device)
    for steps in lengths:
        generator = torch.Generator().manual_seed(steps)
        x = torch.rand(args.batch_size, *SHAPES[steps], generator=generator).to(device)
        y = torch.randint(0, CLASSES, (args.batch_size,), generator=generator).to(device)
        for name in names:
            torch.manual_seed(0)
            model = build(name, SHAPES[steps], args.hidden).to(device)
            optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9)
            found.append(Contender(name, steps, model, optimizer, x, y))
    return found


def saved_megabytes(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """MiB of the distinct storages autograd saves for the backward in one training forward."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(x), y)
    del loss
    return sum(storages.values()) / 2**20


def bench(names: list[str], threads: int, args: argparse.Namespace) -> dict[int, dict]:
    """By length: median step seconds by model (and saved-tensor MiB at the longest), with
    every (length, model) stepping once per round, so load drifts hit all of them alike."""
    torch.set_num_threads(threads)
    found = contenders(names, args.lengths, args)
    for _ in range(args.warmup):
        for contender in found:
            contender.step()
    start, rounds, load = time.perf_counter(), 0, os.getloadavg()[0]
    while rounds < args.min_rounds or time.perf_counter() - start < args.budget:
        for contender in found:
            contender.times.append(contender.step())
        rounds += 1
    load = (load, os.getloadavg()[0])
    results: dict[int, dict] = {steps: {"rounds": rounds, "load": load, "median": {}}
                                for steps in args.lengths}
    for contender in found:
        results[contender.steps]["median"][contender.name] = statistics.median(contender.times)
    longest = [c for c in found if c.steps == max(args.lengths)]
    results[max(args.lengths)]["saved_mb"] = {c.name: saved_megabytes(c.model, c.x, c.y)
                                              for c in longest}
    if torch.device(args.device).type == "cuda":
        results[max(args.lengths)]["peak_mb"] = {c.name: c.peak_megabytes() for c in longest}
    for steps, result in results.items():
        print(f"threads={threads} T={steps}: " + ", ".join(
            f"{name} {seconds * 1e3:.0f} ms" for name, seconds in result["median"].items())
            + f" ({rounds} rounds)", flush=True)
    return results


# --------------------------------------------------------------------------- report
def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return name


def label(name: str) -> str:
    return name if name == TORCH else f"model={name}"


def device_line(args: argparse.Namespace) -> str:
    """The device the contenders ran on, for the report."""
    if torch.device(args.device).type == "cuda":
        return (f"Device: {torch.cuda.get_device_name(args.device)} (torch.nn.LSTM: cuDNN "
                f"{torch.backends.cudnn.version()}), CUDA {torch.version.cuda}; host CPU "
                f"{cpu_name()}")
    return (f"Device: CPU {cpu_name()} ({os.cpu_count()} logical CPUs), torch threads "
            f"{', '.join(map(str, args.threads))}")


def verdict(value: float, target: float) -> str:
    return f"{value:.2f} <= {target} holds" if value <= target else f"{value:.2f} > {target} MISS"


def markdown(results: dict[tuple[int, int], dict], names: list[str],
             args: argparse.Namespace, command: str, load_start: float) -> str:
    longest, lengths = max(args.lengths), sorted(args.lengths)
    lines = [
        "# LSTM training-step cost: ngexp's LSTM family vs torch.nn.LSTM",
        "",
        f"Command: `{command}`  ",
        f"{device_line(args)}; torch {torch.__version__}; "
        f"python {platform.python_version()}; {date.today()}  ",
        f"1-min load average of the machine: {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (contenders interleaved step by step; column "
        "*load*: at the start and end of a thread count's timed rounds; above ~1 on 2 CPUs, "
        "other jobs compete with the 2-thread rounds).  ",
        f"Batch {args.batch_size}, hidden {args.hidden}, {CLASSES} classes; a step is forward + "
        "cross-entropy + backward + RMSProp step. T=28: 28 features per step (rows), 196 and "
        f"784: one pixel per step. Per thread count, every (T, model) steps once per round, in "
        f"turn; {args.warmup} warm-up round(s), then the median over rounds (at least "
        f"{args.min_rounds}, {args.budget:.0f} s). ngexp's models are the presets "
        "conf/model/{lstm,bnlstm,lstm_bn_input}.yaml (hidden size overridden).",
        "",
        "Median ms per training step (in parentheses: / torch.nn.LSTM):",
        "",
        "| threads | T | " + " | ".join(label(name) for name in names) + " | rounds | load |",
        "|---:|---:|" + "---:|" * len(names) + "---:|---|",
    ]
    for (threads, steps), result in results.items():
        base = result["median"][TORCH]
        cells = [f"{result['median'][name] * 1e3:.0f} ({result['median'][name] / base:.2f}x)"
                 for name in names]
        load = "{:.1f} -> {:.1f}".format(*result["load"])
        lines.append(f"| {threads} | {steps} | " + " | ".join(cells)
                     + f" | {result['rounds']} | {load} |")
    if len(lengths) > 1:
        short = lengths[-2]
        lines += ["", f"Time ratio T={longest} / T={short} (linear in T: {longest / short:.1f}):",
                  "", "| threads | " + " | ".join(label(name) for name in names) + " |",
                  "|---:|" + "---:|" * len(names)]
        for threads in args.threads:
            ratios = [results[threads, longest]["median"][name]
                      / results[threads, short]["median"][name] for name in names]
            lines.append(f"| {threads} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    saved = results[args.threads[0], longest]["saved_mb"]
    lines += ["", f"Memory at T={longest}: MiB of tensors autograd saves for the backward in one "
              "training forward (distinct storages, torch.autograd.graph.saved_tensors_hooks; "
              "the activation memory on top of parameters and optimizer state):", "",
              "| " + " | ".join(label(name) for name in names) + " |",
              "|" + "---:|" * len(names),
              "| " + " | ".join(f"{saved[name]:.0f}" for name in names) + " |"]
    peak = results[args.threads[0], longest].get("peak_mb")
    if peak:
        lines += ["", f"Peak device memory during one training step at T={longest} (MiB, "
                  "torch.cuda.max_memory_allocated, parameters and optimizer state included):",
                  "", "| " + " | ".join(label(name) for name in names) + " |",
                  "|" + "---:|" * len(names),
                  "| " + " | ".join(f"{peak[name]:.0f}" for name in names) + " |"]
    lines += ["", f"Targets at T={longest}:", ""]
    for threads in args.threads:
        result = results[threads, longest]
        for name, target in TARGETS.items():
            if name in result["median"]:
                ratio = result["median"][name] / result["median"][TORCH]
                lines.append(f"- {threads} thread(s): model={name} / torch.nn.LSTM = "
                             f"{verdict(ratio, target)}")
        if len(lengths) > 1:
            short = lengths[-2]
            for name in names[1:]:
                ratio = result["median"][name] / results[threads, short]["median"][name]
                lines.append(f"- {threads} thread(s): model={name} T={longest} / T={short} = "
                             f"{verdict(ratio, SCALING_SLACK * longest / short)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--lengths", nargs="+", type=int, default=sorted(SHAPES),
                        choices=sorted(SHAPES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--min-rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds of timed rounds per thread count")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (module docstring)")
    parser.add_argument("--out", default=None, help="markdown file to write the table to")
    args = parser.parse_args()
    args.lengths = sorted(set(args.lengths))
    register_all()
    names = [TORCH, *args.models]
    load_start = os.getloadavg()[0]
    results = {(threads, steps): result for threads in args.threads
               for steps, result in bench(names, threads, args).items()}
    command = " ".join(["python scripts/bench_sequences.py", *sys.argv[1:]])
    text = markdown(results, names, args, command, load_start)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
