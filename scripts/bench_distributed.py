"""Data-parallel step time on the CPU (gloo): 1 and 2 processes, SGD and K-FAC, and the bytes
K-FAC communicates per step and layer under KAISA's placement (``ngexp/optim/kaisa.py``).

Each measurement spawns ``N`` processes (``torch.multiprocessing``, one torch thread each) that
train the model in ``DistributedDataParallel`` on random data of its input shape, ``--batch-size``
examples per process (the global batch grows with ``N``: weak scaling). After ``--warmup``
untimed steps, ``--rounds`` rounds of ``inv_update_freq`` steps are timed (each round holds one
inverse refresh and ``inv/cov`` statistics steps); a round's time is the slowest rank's, and the
median round is reported. Measurements are interleaved (1 process SGD, 1 process K-FAC, 2
processes SGD, ..., then again ``--repeats`` times) so drifting machine load hits them alike;
the table gives the median over repeats.

The communication model counts the payload of each collective (float32), per layer with
``d_A = in_dim`` (+1 with a bias) and ``d_G = out_dim``, ``N`` ranks and ``g = N f`` gradient
workers per layer (``f = grad_worker_fraction``):

    gradient all-reduce (DDP), every step     4 P bytes             (P: the layer's parameters)
    factor all-reduce, statistics steps       4 (d_A^2 + d_G^2)
    terms broadcast, refresh steps            4 (d_A^2 + d_G^2 + 1) to g - 1 ranks
                                              (factored damping: A^-1, G^-1, pi)
    directions broadcast, every step (g < N)  4 d_G d_A from each of g workers to N/g - 1 ranks

and the totals are the bytes a rank receives per step, averaged over ranks and amortized with
``cov_update_freq`` and ``inv_update_freq``: a ring all-reduce passes ``2 (N-1)/N`` times its
payload through each rank, a broadcast its payload to each receiver (``docs/distributed.md``).
Not counted: the all-gather of the outputs for Monte-Carlo targets (batch x classes floats).

    python scripts/bench_distributed.py                       # LeNet-5, writes results/
    python scripts/bench_distributed.py --volume-only --torchvision resnet50 --worlds 8 64 256
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ngexp.config import register_all
from ngexp.curvature.capture import supported_layers
from ngexp.curvature.tasks import build_task
from ngexp.hydra_compat import VERSION_BASE
from ngexp.models import build_model
from ngexp.optim.build import build_optimizer
from ngexp.optim.kaisa import assign, grad_worker_count

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
OPTIMIZERS = ("sgd", "kfac")
BYTES = 4  # float32


def compose_config(model: str, optimizer: str) -> Any:
    register_all()
    with initialize_config_dir(str(CONF), **VERSION_BASE):
        return compose("train", overrides=[f"model={model}", f"optimizer={optimizer}",
                                           "data=synthetic", "trainer.device=cpu"])


# --------------------------------------------------------------------------- volume model
@dataclass(frozen=True)
class LayerVolume:
    """Bytes of one layer's collectives (module docstring), as payloads."""

    name: str
    params: int
    gradient: int  # all-reduce, every step
    factors: int  # all-reduce, per statistics step
    terms: int  # broadcast per refresh, to ``receivers`` ranks
    receivers: int
    directions: int  # per step, summed over the g workers' broadcasts (to N/g - 1 ranks each)
    owner: int


def layer_volumes(model: nn.Module, world: int, fraction: float) -> list[LayerVolume]:
    """The collectives of every K-FAC layer of ``model`` for ``world`` ranks."""
    layers = supported_layers(model)
    workers = grad_worker_count(world, fraction)
    partitions = world // workers
    costs = {layer.name: float(layer.groups * (layer.in_dim**3 + layer.out_dim**3))
             for layer in layers}
    columns = [tuple(range(c, world, partitions)) for c in range(partitions)]
    owners = assign(costs, columns, world)
    volumes = []
    for layer in layers:
        g, d_a, d_g = layer.groups, layer.in_dim, layer.out_dim
        params = sum(p.numel() for p in layer.module.parameters())
        volumes.append(LayerVolume(
            layer.name, params, BYTES * params, BYTES * g * (d_a**2 + d_g**2),
            BYTES * g * (d_a**2 + d_g**2 + 1), workers - 1,
            BYTES * g * d_g * d_a * workers if partitions > 1 else 0, owners[layer.name]))
    # directions: g payloads per step, one per worker (none when every rank is a worker)
    return volumes


def volume_table(model: nn.Module, worlds: list[int], fractions: list[str], cov_freq: int,
                 inv_freq: int) -> list[str]:
    """Markdown: per layer for the largest world and f = 1/N, then model totals."""
    world = max(worlds)
    lines = [f"Per layer, N = {world}, f = 1/{world} (payloads; terms go from the owner to "
             "the other gradient workers, directions from each worker to N/g - 1 ranks):", "",
             "| layer | params | gradient | factors | terms (x receivers) | directions "
             "| owner |", "|---|---:|---:|---:|---:|---:|---:|"]
    for v in layer_volumes(model, world, 1 / world):
        lines.append(f"| {v.name} | {v.params:,} | {mb(v.gradient)} | {mb(v.factors)} | "
                     f"{mb(v.terms)} x {v.receivers} | {mb(v.directions)} | {v.owner} |")
    lines += ["", f"Per rank and step, bytes received (the mean over ranks; "
              f"cov_update_freq={cov_freq}, inv_update_freq={inv_freq}; ring all-reduce "
              "2 (N-1)/N x payload):", "",
              "| N | f | gradient all-reduce | factor all-reduce | terms broadcast | "
              "directions broadcast | K-FAC total (beside the gradient) |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for n in worlds:
        for label in fractions:
            fraction = 1 / n if label == "1/N" else eval_fraction(label)
            workers = grad_worker_count(n, fraction)
            vols = layer_volumes(model, n, fraction)
            ring = 2 * (n - 1) / n
            grad = ring * sum(v.gradient for v in vols)
            fac = ring * sum(v.factors for v in vols) / cov_freq
            terms = sum(v.terms for v in vols) * (workers - 1) / n / inv_freq
            dirs = sum(v.directions / workers for v in vols) * (n - workers) / n
            lines.append(f"| {n} | {label} | {mb(grad)} | {mb(fac)} | {mb(terms)} | "
                         f"{mb(dirs)} | {mb(fac + terms + dirs)} |")
    return lines


def eval_fraction(label: str) -> float:
    numerator, _, denominator = label.partition("/")
    return float(numerator) / float(denominator or 1)


def mb(value: float) -> str:
    return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"


# --------------------------------------------------------------------------- timing
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, optimizer: str,
           queue: Any) -> None:
    """One rank: train ``args.model`` with ``optimizer``; rank 0 puts the round times."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world))
        dist.init_process_group("gloo", init_method="env://")
    cfg = compose_config(args.model, optimizer)
    data = instantiate(cfg.data, _partial_=True)()
    torch.manual_seed(0)
    model = build_model(cfg.model, data.spec)
    task = build_task(getattr(model, "task", data.spec.task))
    opt = build_optimizer(cfg.optimizer, model, task)
    forward = DistributedDataParallel(model) if world > 1 else model
    round_steps = int(cfg.optimizer.get("inv_update_freq", args.sgd_round))
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(args.batch_size, *data.spec.input_shape, generator=generator)
    targets = torch.randint(data.spec.num_classes, (args.batch_size,), generator=generator)

    def step() -> None:
        opt.zero_grad()
        outputs = forward(inputs)
        loss = task.loss(outputs, targets)
        opt.backward(loss, outputs, targets)
        opt.step()

    for _ in range(args.warmup):
        step()
    rounds = []
    for _ in range(args.rounds):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(round_steps):
            step()
        elapsed = torch.tensor([(time.perf_counter() - start) / round_steps])
        if world > 1:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        rounds.append(float(elapsed))
    if rank == 0:
        queue.put(statistics.median(rounds))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, optimizer: str, args: argparse.Namespace) -> float:
    """Median step time (s) of ``world`` processes training with ``optimizer``."""
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(worker, args=(world, free_port(), args, optimizer, queue),
                       nprocs=world, start_method="spawn")
    return queue.get()


def versions() -> str:
    import hydra

    return (f"torch {torch.__version__}, hydra {hydra.__version__}, "
            f"python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sgd-round", type=int, default=100, help="SGD steps per round")
    parser.add_argument("--fractions", nargs="+", default=["1/N", "1/2", "1"],
                        help="grad_worker_fraction values of the volume table")
    parser.add_argument("--volume-only", action="store_true", help="print the volume model")
    parser.add_argument("--torchvision", help="volume model of this torchvision model")
    parser.add_argument("--out", type=Path, default=REPO / "results/bench_distributed_cpu.md")
    args = parser.parse_args()

    cfg = compose_config(args.model, "kfac")
    cov_freq, inv_freq = int(cfg.optimizer.cov_update_freq), int(cfg.optimizer.inv_update_freq)
    if args.torchvision:
        import torchvision

        model, name = getattr(torchvision.models, args.torchvision)(), args.torchvision
    else:
        data = instantiate(cfg.data, _partial_=True)()
        model, name = build_model(cfg.model, data.spec), args.model
    volumes = volume_table(model, args.worlds, args.fractions, cov_freq, inv_freq)
    if args.volume_only:
        print(f"K-FAC communication of {name}\n")
        print("\n".join(volumes))
        return

    times: dict[tuple[int, str], list[float]] = {}
    for repeat in range(args.repeats):
        for world in args.worlds:
            for optimizer in args.optimizers:
                seconds = measure(world, optimizer, args)
                times.setdefault((world, optimizer), []).append(seconds)
                print(f"repeat {repeat}: {world} process(es) {optimizer}: "
                      f"{1000 * seconds:.1f} ms/step", flush=True)
    lines = [f"# Data-parallel step time on the CPU (gloo): {name}", "",
             f"Command: `python {' '.join(sys.argv)}`  ",
             f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"1 torch thread per process; {versions()}; {date.today()}  ",
             f"Batch {args.batch_size} per process (global batch = processes x "
             f"{args.batch_size}), random inputs; median of {args.repeats} interleaved repeats of "
             f"the median of {args.rounds} rounds (K-FAC: {inv_freq} steps with one refresh; "
             f"SGD: {args.sgd_round}).", "",
             "| processes | optimizer | step (ms) | examples/s | speed-up vs 1 process |",
             "|---:|---|---:|---:|---:|"]
    for world in args.worlds:
        for optimizer in args.optimizers:
            seconds = statistics.median(times[(world, optimizer)])
            base = statistics.median(times.get((1, optimizer), [seconds]))
            lines.append(f"| {world} | {optimizer} | {1000 * seconds:.1f} | "
                         f"{world * args.batch_size / seconds:,.0f} | "
                         f"{world * base / seconds:.2f} |")
    lines += ["", f"K-FAC communication of {name} (`ngexp/optim/kaisa.py` placement, the model "
              "in `scripts/bench_distributed.py`):", "", *volumes, ""]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
