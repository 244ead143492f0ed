"""Per-step cost of ngexp's K-FAC, EKFAC and natural gradient against SGD and against peer
libraries (ASDL's K-FAC, nngeometry's KFAC matrix), on the same model and batches.

Every contender trains its own copy of one initialized model on the same batches, in one
process, taking turns step by step (SGD, K-FAC, EKFAC, ..., ASDL, SGD, ...) so drifting machine
load hits them alike. A round is ``--inv-update-freq`` steps (the natural gradient:
``--ng-steps``), so it holds exactly one inverse/eigenbasis refresh and ``inv/cov`` statistics
steps; the round with the median total per-step time is reported, after ``--warmup-steps``
untimed steps. The *refresh
step* (statistics + refresh + step) is reported on its own, as a multiple of SGD's step.

The K-FAC contenders use the same settings: MC Fisher (one sample), statistics every
``--cov-update-freq`` steps with an exponential average (decay 0.95), damped inverses every
``--inv-update-freq`` steps with factored Tikhonov damping and the pi correction, SGD with
momentum 0.9 and lr 0.03 taking the step. ngexp also KL-clips (its default; ``--no-kl-clip``
turns it off). nngeometry computes the Fisher's expectation over the classes in closed form
(no sampling), which is its only K-FAC; it has no training loop, so its statistics,
averaging, inversion and preconditioning are driven here.

For ngexp's contenders each step is also split into phases (``torch.cuda.synchronize()`` at each
boundary on a GPU): forward + backward (curvature capture, the MC backward), then inside the
preconditioner's step the factor and scaling updates (``_statistics.update``,
``_update_scaling``) and the refresh (``terms.refresh``):

    statistics      = (forward+backward - SGD's) + factor / scaling updates
    decomposition   = refreshes (amortized over inv_update_freq steps)
    preconditioning = rest of the step - SGD's step (the natural gradient: the CG solve)

``--precisions fp32 bf16`` runs every model in float32 and under bf16 autocast (ngexp's
contenders; the peers in float32 only), ``--channels-last`` with channels-last weights and
inputs, as ``trainer.precision`` and ``trainer.channels_last`` do in training.

    python scripts/bench_optim.py --threads 1 --peers asdl nngeometry   # CPU: MLP and LeNet-5
    python scripts/bench_optim.py --threads 1 --models vit --optimizers sgd kfac ekfac
    python scripts/bench_optim.py --threads 1 --models autoencoder --batch-size 64 \\
        --optimizers sgd adam kfac ekfac     # the frontier study's autoencoder step
    python scripts/bench_optim.py --device cuda --precisions fp32 bf16  # VGG-16, preact ResNet-18
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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor, nn

from ngexp.config import register_all
from ngexp.curvature.tasks import Task, build_task
from ngexp.data.bundle import DataBundle
from ngexp.hydra_compat import VERSION_BASE
from ngexp.models import build_model
from ngexp.optim.build import build_optimizer
from ngexp.optim.training import TrainingOptimizer

CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIMIZERS = ("sgd", "adam", "kfac", "ekfac", "natural_gradient")
PEERS = ("asdl", "nngeometry")
#: Methods of the Kronecker preconditioners (or of their parts, dotted) timed inside ``step``,
#: by the phase they belong to.
PHASE_METHODS = {"_statistics.update": "statistics", "_update_scaling": "statistics",
                 "terms.refresh": "decomposition"}
CPU_MODELS = ("mlp", "lenet5")
GPU_MODELS = ("vgg16", "preact_resnet18")
#: Data overrides by ``--data``: real Fashion-MNIST, or random tensors of CIFAR-10 shapes.
DATA = {"fashion_mnist": ["data=fashion_mnist"],
        "synthetic_cifar": ["data=synthetic", "data.shape=[3,32,32]", "data.num_train=5120"]}
#: The K-FAC settings every contender shares.
LR, MOMENTUM, STAT_DECAY = 0.03, 0.9, 0.95
Batch = Callable[[int], tuple[Tensor, Tensor]]


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
    """One method on its own copy of the model: ``forward_backward(x, y)`` then ``step()``."""

    name: str
    model: nn.Module
    forward_backward: Callable[[Tensor, Tensor], None]
    step: Callable[[], None]
    timer: SegmentTimer
    window: int
    state: Callable[[], Any]
    after_step: Callable[[], None] = lambda: None
    rounds: list[dict[str, float]] = field(default_factory=list)
    refresh_ms: list[float] = field(default_factory=list)
    cg_iters: list[float] = field(default_factory=list)
    #: Share of the parameter count that a preconditioner covers (``None``: no preconditioner).
    covered: float | None = None


def compose_config(overrides: list[str]) -> Any:
    with initialize_config_dir(str(CONF), **VERSION_BASE):
        return compose("train", overrides=overrides)


def batches(data: DataBundle, task: Task, batch_size: int, seed: int,
            channels_last: bool) -> Batch:
    """Batch ``i`` of a fixed random order of the training split (the same for every method),
    as inputs and the ``task``'s targets, images in channels-last layout with
    ``channels_last``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train), generator=generator).to(data.train.inputs.device)
    per_epoch = len(order) // batch_size

    def batch(i: int) -> tuple[Tensor, Tensor]:
        index = order[(i % per_epoch) * batch_size:(i % per_epoch + 1) * batch_size]
        inputs = data.train.inputs[index]
        if channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, task.targets(inputs, data.train.targets[index])

    return batch


# --------------------------------------------------------------------------- contenders
def ngexp_contender(name: str, model: nn.Module, cfg: Any, task: Task, device: torch.device,
                    window: int, precision: str) -> Contender:
    optimizer: TrainingOptimizer = build_optimizer(cfg.optimizer, model, task)
    timer = SegmentTimer(device)
    pre = optimizer.preconditioner
    for path, phase in PHASE_METHODS.items():
        *parts, method = path.split(".")
        owner: Any = pre
        for part in parts:
            owner = getattr(owner, part, None)
        if owner is not None and hasattr(owner, method):
            timer.instrument(owner, method, phase)

    def forward_backward(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad()
        with autocast(device, precision):
            outputs = model(x)
            loss = task.loss(outputs, y)
        optimizer.backward(loss, outputs, y)

    contender = Contender(name, model, forward_backward, optimizer.step, timer, window,
                          optimizer.state_dict, covered=None if pre is None else pre.coverage.share)
    if name == "natural_gradient":
        contender.after_step = lambda: contender.cg_iters.append(
            optimizer.log_metrics()["cg_iters"])
    return contender


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast as the engine's ``trainer.precision=bf16``; nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def asdl_contender(model: nn.Module, args: argparse.Namespace, damping: float,
                   device: torch.device) -> Contender:
    from asdl.precondition import KfacGradientMaker, PreconditioningConfig

    config = PreconditioningConfig(data_size=args.batch_size, damping=damping,
                                   curvature_upd_interval=args.cov_update_freq,
                                   preconditioner_upd_interval=args.inv_update_freq,
                                   ema_decay=1 - STAT_DECAY)
    maker = KfacGradientMaker(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def forward_backward(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        dummy = maker.setup_model_call(model, x)
        maker.setup_loss_call(torch.nn.functional.cross_entropy, dummy, y)
        maker.forward_and_backward()  # includes ASDL's preconditioning of .grad

    return Contender("asdl_kfac", model, forward_backward, opt.step, SegmentTimer(device),
                     args.inv_update_freq, lambda: {"optimizer": opt.state_dict()})


def nngeometry_contender(model: nn.Module, args: argparse.Namespace, damping: float,
                         device: torch.device) -> Contender:
    """nngeometry's PMatKFAC: statistics every ``cov`` steps (closed-form expectation over the
    classes), averaged like the others, damped inverse (pi correction) every ``inv`` steps."""
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatKFAC, PVector

    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    state: dict[str, Any] = {"step": 0, "fisher": None, "inverse": None, "updates": 0}

    def forward_backward(x: Tensor, y: Tensor) -> None:
        step = state["step"]
        if step % args.cov_update_freq == 0:
            fisher = FIM(model, (x, y), PMatKFAC, variant="classif_logits", device=device.type)
            state["updates"] += 1
            if state["fisher"] is None:
                state["fisher"] = fisher
            else:
                decay = min(STAT_DECAY, 1 - 1 / state["updates"])
                for key, (a, g) in fisher.data.items():
                    old_a, old_g = state["fisher"].data[key]
                    state["fisher"].data[key] = (torch.lerp(a, old_a, decay),
                                                 torch.lerp(g, old_g, decay))
        if step % args.inv_update_freq == 0:
            state["inverse"] = state["fisher"].inverse(regul=damping)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    def step() -> None:
        direction = state["inverse"].mv(PVector.from_model_grad(model)).to_dict()
        for (weight, bias), module in zip(direction.values(), linear_and_conv(model),
                                          strict=True):
            module.weight.grad.copy_(weight.view_as(module.weight))
            if module.bias is not None:
                module.bias.grad.copy_(bias.view_as(module.bias))
        opt.step()
        state["step"] += 1

    return Contender("nngeometry_kfac", model, forward_backward, step, SegmentTimer(device),
                     args.inv_update_freq, lambda: {"optimizer": opt.state_dict(),
                                                    "factors": state["fisher"].data})


def linear_and_conv(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# --------------------------------------------------------------------------- measuring
def run_steps(contender: Contender, batch: Batch, start: int, steps: int,
              refresh_every: int) -> dict[str, float]:
    """Train ``steps`` steps from step index ``start``; ms per step by segment (the refresh
    steps, those at multiples of ``refresh_every``, also recorded on their own)."""
    timer = contender.timer
    timer.totals.clear()
    for i in range(start, start + steps):
        x, y = batch(i)
        begin = time.perf_counter()
        with timer("forward_backward"):
            contender.forward_backward(x, y)
        with timer("step"):
            contender.step()
        if timer.sync:
            torch.cuda.synchronize()
        if i % refresh_every == 0:
            contender.refresh_ms.append(1e3 * (time.perf_counter() - begin))
        contender.after_step()
    return {name: 1e3 * total / steps for name, total in timer.totals.items()}


def state_megabytes(state: Any) -> float:
    """Size of the tensors in a state (moments, factors, inverses, CG solution)."""

    def size(value: Any) -> int:
        if isinstance(value, Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0

    return size(state) / 2**20


def bench_model(model_name: str, args: argparse.Namespace, device: torch.device,
                precision: str) -> list[dict]:
    base = [f"model={model_name}", *DATA[args.data], f"trainer.device={device.type}",
            f"seed={args.seed}"]
    cfg = compose_config(base)
    torch.manual_seed(args.seed)
    data = instantiate(cfg.data, _partial_=True)().to(device)
    template = build_model(cfg.model, data.spec).to(device)
    if args.channels_last:
        template = template.to(memory_format=torch.channels_last)
    task = build_task(getattr(template, "task", data.spec.task))
    batch = batches(data, task, args.batch_size, args.seed, args.channels_last)
    label = model_name if len(args.precisions) == 1 else f"{model_name} {precision}"
    kronecker = [f"optimizer.cov_update_freq={args.cov_update_freq}",
                 f"optimizer.inv_update_freq={args.inv_update_freq}",
                 *(["optimizer.kl_clip=null"] if args.no_kl_clip else [])]
    contenders = []
    for name in args.optimizers:
        overrides = [f"optimizer={name}", *(kronecker if name in ("kfac", "ekfac") else [])]
        cfg_name = compose_config(base + overrides)
        window = args.ng_steps if name == "natural_gradient" else args.inv_update_freq
        contenders.append(ngexp_contender(name, copy.deepcopy(template), cfg_name, task, device,
                                          window, precision))
    damping = float(compose_config(base + ["optimizer=kfac"]).optimizer.damping)
    own = {id(p) for m in linear_and_conv(template) for p in m.parameters(recurse=False)}
    if args.peers and any(id(p) not in own for p in template.parameters()):
        raise SystemExit(f"--peers {' '.join(args.peers)}: the peers are driven here for models "
                         f"of Linear/Conv2d layers only; model={model_name} has others (run it "
                         f"without --peers)")
    builders = {"asdl": asdl_contender, "nngeometry": nngeometry_contender}
    for peer in args.peers if precision == "fp32" else []:
        contenders.append(builders[peer](copy.deepcopy(template), args, damping, device))

    peaks: dict[str, list[float]] = defaultdict(list)
    for contender in contenders:
        run_steps(contender, batch, 0, args.warmup_steps, args.inv_update_freq)
        contender.cg_iters.clear()
        contender.refresh_ms.clear()
    for round_index in range(args.rounds):
        # within a round the methods take turns step by step, so drifting machine load (a
        # shared CPU) hits them alike; a round's per-step mean is one sample
        timed = [(c, args.warmup_steps + round_index * c.window) for c in contenders]
        sums: dict[str, dict[str, float]] = {c.name: defaultdict(float) for c in contenders}
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for offset in range(max(c.window for c in contenders)):
            for contender, start in timed:
                if offset < contender.window:
                    step_ms = run_steps(contender, batch, start + offset, 1,
                                        args.inv_update_freq)
                    for key, value in step_ms.items():
                        sums[contender.name][key] += value / contender.window
        for contender in contenders:
            contender.rounds.append(dict(sums[contender.name]))
            if device.type == "cuda":
                peaks[contender.name].append(torch.cuda.max_memory_allocated() / 2**20)
    rows = [summarize(c, label, peaks.get(c.name)) for c in contenders]
    sgd = next((r for r in rows if r["optimizer"] == "sgd"), None)
    if sgd is not None:  # extra cost over SGD, also in units of SGD's step time
        for row in rows:
            row["statistics"] += row["forward_backward"] - sgd["forward_backward"]
            row["preconditioning"] = row["step_rest"] - sgd["step_rest"]
            for key in ("total", "statistics", "decomposition", "preconditioning", "refresh"):
                if row[key] is not None:
                    row[f"{key}_x"] = row[key] / sgd["total"]
    return rows


def summarize(contender: Contender, model_name: str, peaks: list[float] | None) -> dict:
    """The median round (by total ms per step), its segments, and the state size."""
    totals = [r["forward_backward"] + r["step"] for r in contender.rounds]
    median_round = contender.rounds[totals.index(statistics.median_low(totals))]
    in_step = {phase: median_round.get(phase, 0.0) for phase in ("statistics", "decomposition")}
    row = {"model": model_name, "optimizer": contender.name,
           "forward_backward": median_round["forward_backward"], "step": median_round["step"],
           "total": median_round["forward_backward"] + median_round["step"],
           "statistics": in_step["statistics"], "decomposition": in_step["decomposition"],
           "step_rest": median_round["step"] - sum(in_step.values()),
           "refresh": statistics.median(contender.refresh_ms) if contender.refresh_ms else None,
           "state_mb": state_megabytes(contender.state()),
           "peak_mb": statistics.median(peaks) if peaks else None,
           "rounds_total_ms": totals, "phases": not contender.name.endswith("_kfac")}
    if contender.cg_iters:
        row["cg_iters"] = statistics.fmean(contender.cg_iters)
    if contender.covered is not None:
        row["covered"] = contender.covered
    return row


# --------------------------------------------------------------------------- report
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


def versions(peers: list[str]) -> str:
    names = {"asdl": "asdfghjkl", "nngeometry": "nngeometry"}
    found = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    found += [f"{names[p]} {metadata.version(names[p])}" for p in peers]
    return "; ".join(found)


def cell(row: dict, key: str) -> str:
    """``ms (+x SGD)`` of one phase, ``-`` for a peer (not split into phases)."""
    if not row["phases"]:
        return "-"
    ratio = f" ({row[f'{key}_x']:+.2f})" if f"{key}_x" in row else ""
    return f"{row[key]:.2f}{ratio}"


def markdown(rows: list[dict], args: argparse.Namespace, device: torch.device,
             command: str, load_start: float) -> str:
    gpu = device.type == "cuda"
    lines = [
        "# Optimizer step cost relative to SGD and to peer libraries",
        "",
        f"Command: `{command}`  ",
        f"Device: {device_description(device)}; {versions(args.peers)}; {date.today()}  ",
        f"1-min load average of the machine: {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (interleaved rounds spread other jobs' load "
        "over all methods alike).  ",
        f"Data {args.data}; batch {args.batch_size}; "
        f"{' and '.join(args.precisions)}{'; channels_last' if args.channels_last else ''}; "
        f"K-FAC statistics every "
        f"{args.cov_update_freq} steps, inverses every {args.inv_update_freq} steps; ngexp's "
        f"other options from its defaults{' (KL clipping off)' if args.no_kl_clip else ''}. "
        f"{args.warmup_steps} warm-up steps, then the median of {args.rounds} interleaved "
        f"rounds ({args.inv_update_freq} steps each; natural gradient: {args.ng_steps}).  ",
        "Columns are ms per step; in parentheses, in units of SGD's mean step, so "
        "x SGD = 1 + statistics + decomposition + preconditioning (docstring of "
        "scripts/bench_optim.py). *Refresh step*: one step that updates the statistics and "
        "refreshes the inverses (median over rounds).",
        "",
        "| model | method | total ms | x SGD | refresh step (x SGD) | statistics | "
        f"decomposition | preconditioning | state MB |{' peak MB |' if gpu else ''} notes |",
        f"|---|---|---:|---:|---:|---:|---:|---:|---:|{'---:|' if gpu else ''}---|",
    ]
    for r in rows:
        stats, decomposition, preconditioning = (
            cell(r, key) for key in ("statistics", "decomposition", "preconditioning"))
        notes = ([f"preconditions {100 * r['covered']:.1f}% of the parameters"]
                 if r.get("covered", 1.0) < 1.0 else [])
        notes += [f"mean CG iterations {r['cg_iters']:.1f}"] if "cg_iters" in r else []
        note = "; ".join(notes)
        peak = f" {r['peak_mb']:.0f} |" if gpu else ""
        ratio = f"{r['total_x']:.2f}x" if "total_x" in r else ""
        refresh = (f"{r['refresh']:.1f} ({r['refresh_x']:.1f}x)"
                   if r["refresh"] is not None and "refresh_x" in r
                   and r["optimizer"] not in ("sgd", "natural_gradient") else "")
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['total']:.2f} | {ratio} | "
                     f"{refresh} | {stats} | {decomposition} | {preconditioning} | "
                     f"{r['state_mb']:.2f} |{peak} {note} |")
    lines += ["", "Ratios:", ""]
    by_model: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_model[r["model"]][r["optimizer"]] = r
    for model, found in by_model.items():
        for name, r in found.items():
            if name != "sgd" and "total_x" in r:
                lines.append(f"- {model}: {name} / sgd = {r['total_x']:.2f}x")
        for peer in ("asdl_kfac", "nngeometry_kfac"):
            if peer in found and "kfac" in found:
                ours, theirs = found["kfac"], found[peer]
                lines.append(f"- {model}: ngexp kfac / {peer} = "
                             f"{ours['total'] / theirs['total']:.2f}x per step, refresh step "
                             f"{ours['refresh'] / theirs['refresh']:.2f}x")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"default: {' '.join(CPU_MODELS)} on CPU, "
                             f"{' '.join(GPU_MODELS)} on CUDA; others (e.g. vit) write "
                             f"results/bench_optim_<models>_<device>.md")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--peers", nargs="*", default=[], choices=PEERS,
                        help="peer libraries to run beside ngexp (pip install 'ngexp[bench]')")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--data", default=None, choices=tuple(DATA),
                        help="default: fashion_mnist on CPU, synthetic_cifar on CUDA")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=("fp32", "bf16"),
                        help="bf16: autocast, as trainer.precision=bf16")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels-last weights and inputs, as trainer.channels_last=true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--cov-update-freq", type=int, default=10)
    parser.add_argument("--inv-update-freq", type=int, default=100)
    parser.add_argument("--ng-steps", type=int, default=10, help="steps per natural-gradient round")
    parser.add_argument("--no-kl-clip", action="store_true", help="ngexp without KL clipping")
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
    rows = [row for name in models for precision in args.precisions
            for row in bench_model(name, args, device, precision)]
    command = " ".join(["python scripts/bench_optim.py", *sys.argv[1:]])
    text = markdown(rows, args, device, command.strip(), load_start)
    print(text)
    default = list(GPU_MODELS if gpu else CPU_MODELS)
    named = "" if models == default else "_".join(models) + "_"
    out = Path(args.out or f"results/bench_optim_{named}{'gpu' if gpu else 'cpu'}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
