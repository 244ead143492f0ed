"""Training throughput of ngexp's engine against a minimal hand-written PyTorch loop.

Both train the same model (built by ngexp from the same config, same initial weights) with the
same optimizer and batch size on the same device-resident tensors; the minimal loop is just
``index -> forward -> cross-entropy -> backward -> step``. They run in ABBA order (engine,
minimal, minimal, engine; a warm-up window dropped each time) and the median examples/s over the
pooled windows of each is reported with their ratio
(engine / minimal: >= 1 means the engine is no slower). The engine runs with its defaults
(cosine schedule, metric accumulation, NaN watch, logging every ``--steps`` steps).

On a GPU (``--gpu``: VGG-16 and preact ResNet-18 at CIFAR shapes, synthetic data) each model is
measured twice: the engine in float32 against the float32 minimal loop (the engine's overhead),
and the engine's fast path (bf16 autocast, channels_last, ``torch.compile``) against the same
float32 minimal loop (what a user gains by switching it on).

    python scripts/bench_engine.py          # CPU: MLP and LeNet-5 on Fashion-MNIST
    python scripts/bench_engine.py --gpu    # CUDA: VGG-16 and preact ResNet-18, CIFAR shapes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict
from rich.console import Console

from ngexp.config import register_all
from ngexp.curvature.tasks import Classification
from ngexp.hydra_compat import VERSION_BASE
from ngexp.models import build_model
from ngexp.optim.build import build_optimizer
from ngexp.train.build import build_run
from ngexp.train.session import run_session
from ngexp.train.trainer import Trainer

CONF = Path(__file__).resolve().parents[1] / "conf"
#: The models of the GPU cases, with their names in the table.
GPU_MODELS = {"vgg16": "VGG-16", "preact_resnet18": "preact ResNet-18"}


def run_engine(overrides: list[str], steps: int, rounds: int, run_dir: Path) -> list[float]:
    """Examples/s of ngexp's real training loop (``ngexp.train.session.run_session``), one
    value per ``steps``-step window as the trainer measures it (batching, step, metric
    accumulation; evaluation and the once-per-window logging excluded); the first window is
    warm-up and dropped."""
    with initialize_config_dir(str(CONF), **VERSION_BASE):
        cfg = compose("train", overrides=[*overrides, f"trainer.max_steps={steps * (rounds + 1)}",
                                          f"trainer.log_every={steps}", "trainer.progress=none"],
                      return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    run_session(Trainer(build_run(cfg, choices, run_dir, Console(quiet=True))))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/examples_per_s"] for r in records if "train/examples_per_s" in r][1:]


def minimal_rates(overrides: list[str], steps: int, rounds: int) -> list[float]:
    """The same model, optimizer, batch and device tensors in a minimal loop."""
    with initialize_config_dir(str(CONF), **VERSION_BASE):
        cfg = compose("train", overrides=overrides)
    device = torch.device(cfg.trainer.device)
    torch.manual_seed(cfg.seed)
    data = instantiate(cfg.data, _partial_=True)().to(device)
    model = build_model(cfg.model, data.spec).to(device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, model, Classification()).optimizer  # torch SGD
    inputs, targets, batch = data.train.inputs, data.train.targets, cfg.trainer.batch_size
    rates = []
    for _ in range(rounds + 1):
        permutation = torch.randperm(len(inputs), device=device)
        start = time.perf_counter()
        for i in range(steps):
            index = permutation[i * batch:(i + 1) * batch]
            x = inputs[index]
            if cfg.trainer.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=cfg.trainer.precision == "bf16"):
                loss = F.cross_entropy(model(x), targets[index])
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - start))
    return rates[1:]


def bench(label: str, overrides: list[str], fast_path: list[str], steps: int,
          rounds: int) -> dict[str, float | str]:
    """Engine (with the ``fast_path`` overrides) and minimal loop in ABBA order (windows
    pooled), so a drift in machine load affects both alike."""
    engine: list[float] = []
    minimal: list[float] = []
    for order in ("engine", "minimal", "minimal", "engine"):
        if order == "engine":
            with tempfile.TemporaryDirectory() as tmp:
                engine += run_engine(overrides + fast_path, steps, rounds, Path(tmp))
        else:
            minimal += minimal_rates(overrides, steps, rounds)
    ngexp_rate, plain_rate = statistics.median(engine), statistics.median(minimal)
    return {"case": label, "engine": ngexp_rate, "minimal": plain_rate,
            "ratio": ngexp_rate / plain_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="the CUDA cases instead")
    parser.add_argument("--device", default="cuda",
                        help="device of the --gpu cases (cpu: a dry run of this script)")
    parser.add_argument("--models", nargs="+", default=list(GPU_MODELS),
                        help=f"models of the --gpu cases (default: {' '.join(GPU_MODELS)})")
    parser.add_argument("--out", default=None,
                        help="markdown file; default results/bench_engine_{cpu,gpu}.md")
    args = parser.parse_args()
    on_cuda = args.gpu and args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device (--device cpu: a dry run on the CPU)")
    register_all()
    cases: list[tuple[str, list[str], list[str]]] = [
        ("MLP 784-512-256-10, Fashion-MNIST, batch 128", ["model=mlp", "trainer.device=cpu"], []),
        ("LeNet-5, Fashion-MNIST, batch 128", ["model=lenet5", "trainer.device=cpu"], []),
    ]
    if args.gpu:
        synthetic = ["data=synthetic", "data.shape=[3,32,32]", f"trainer.device={args.device}"]
        fast = ["trainer.precision=bf16", "trainer.channels_last=true", "trainer.compile=true"]
        cases = [(f"{name}, CIFAR shapes, batch 128, {variant}", [f"model={model}", *synthetic],
                  fast_path)
                 for model in args.models for name in [GPU_MODELS.get(model, model)]
                 for variant, fast_path in (("fp32", []),
                                            ("engine bf16+channels_last+compile", fast))]
    load = f"{__import__('os').getloadavg()[0]:.1f}"
    rows = [bench(label, overrides + ["optimizer=sgd"], fast_path, args.steps, args.rounds)
            for label, overrides, fast_path in cases]
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    device = torch.cuda.get_device_name() if on_cuda else cpu
    lines = [
        "# Engine throughput vs a minimal PyTorch loop",
        "",
        f"Command: `python scripts/bench_engine.py {' '.join(sys.argv[1:])}`  ",
        f"Device: {device}; torch {torch.__version__}; python {platform.python_version()}; "
        f"{date.today()}  ",
        f"Median over 2 x {args.rounds} windows of {args.steps} SGD steps each, engine and "
        f"minimal loop in ABBA order; the minimal loop is float32 eager in every row. "
        f"1-min load average before the run: {load}.",
        "",
        "| case | ngexp engine (examples/s) | minimal loop (examples/s) | engine / minimal |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['case']} | {r['engine']:.0f} | {r['minimal']:.0f} | {r['ratio']:.3f} |"
              for r in rows]
    if not args.gpu:
        lines += ["", "The VGG-16 and ResNet-18 cases need a CUDA device: "
                  "`python scripts/bench_engine.py --gpu`."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out or f"results/bench_engine_{'gpu' if args.gpu else 'cpu'}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
