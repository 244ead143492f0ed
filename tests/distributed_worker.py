"""The library-level scenarios of ``tests/test_distributed.py``, run by each rank of a 2-process
gloo group (``torch.multiprocessing``) and by one process on the union batch: the same seeds,
data and steps, so their results must agree up to the order of floating-point sums.

Each scenario returns a dict of tensors; :func:`run_rank` saves a rank's to ``rank_<r>.pt``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ngexp.curvature.tasks import Classification
from ngexp.distributed.world import World, current
from ngexp.optim.ekfac import EKFAC
from ngexp.optim.hessian_free import HessianFree
from ngexp.optim.kfac import KFAC
from ngexp.optim.natural_gradient import NaturalGradient
from ngexp.optim.tonga import TONGA
from ngexp.prune.masks import Masks, prunable_layers
from ngexp.prune.pruner import Pruner

#: Examples per rank and step; one process takes ``WORLD x BATCH``.
WORLD, BATCH, STEPS = 2, 16, 10
Scenario = Callable[[World], dict[str, Tensor]]


def net() -> nn.Module:
    """Two convolutions and two linear layers (four K-FAC layers of unequal cost), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def data(steps: int = STEPS) -> tuple[Tensor, Tensor]:
    """The global batches: inputs ``(steps, WORLD B, 1, 8, 8)``, labels ``(steps, WORLD B)``."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(steps, WORLD * BATCH, 1, 8, 8, generator=generator)
    return inputs, torch.randint(10, (steps, WORLD * BATCH), generator=generator)


def rows(world: World) -> slice:
    """This rank's rows of a global batch (all of them in one process)."""
    if not world.distributed:
        return slice(None)
    return slice(world.rank * BATCH, (world.rank + 1) * BATCH)


def train(world: World, build: Callable[[nn.Module], Any], steps: int = STEPS,
          resume_at: int | None = None) -> dict[str, Tensor]:
    """``steps`` steps of SGD with momentum, preconditioned by ``build(model)`` (or plain for
    ``None``), the model in DDP across ranks. Returns the weights, the last step's
    preconditioned gradients (``grad.<name>``) and the curvature factors (``A.<layer>`` ...).
    ``resume_at``: at that step, rebuild model, optimizer and preconditioner from their
    ``state_dict`` s (what a checkpoint holds) and continue."""
    model, task = net(), Classification()
    inputs, labels = data(steps)
    torch.manual_seed(2)  # the preconditioner's MC generator is seeded from this
    pre = build(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    forward = DistributedDataParallel(model) if world.distributed else model
    out: dict[str, Tensor] = {}
    for step in range(steps):
        if step == resume_at:
            saved = [model.state_dict(), opt.state_dict(), pre.state_dict() if pre else None]
            model = net()
            model.load_state_dict(saved[0])
            pre = build(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            opt.load_state_dict(saved[1])
            if pre is not None:
                pre.load_state_dict(saved[2])
            forward = DistributedDataParallel(model) if world.distributed else model
        x, y = inputs[step][rows(world)], labels[step][rows(world)]
        opt.zero_grad(set_to_none=True)
        outputs = forward(x)
        loss = task.loss(outputs, y)
        if pre is None:
            loss.backward()
        else:
            pre.backward(loss, outputs, targets=y)
            pre.step()
        if step == steps - 1:
            out.update({f"grad.{n}": p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    out.update({f"weight.{n}": p.detach().clone() for n, p in model.named_parameters()})
    if isinstance(pre, (KFAC, EKFAC)):
        out.update({f"{key}.{layer}": value.clone() for layer, values in pre.curvature().items()
                    for key, value in values.items() if key in ("A", "G", "s")})
    return out


def kronecker(kind: type[KFAC] | type[EKFAC], fraction: float, **options: Any) -> Scenario:
    def scenario(world: World) -> dict[str, Tensor]:
        return train(world, lambda m: kind(m, cov_update_freq=1, inv_update_freq=3,
                                           grad_worker_fraction=fraction, **options))
    return scenario


def masks(criterion: str, fisher_type: str) -> Scenario:
    """The masks of one pruning step to 50% (global scope) on 3 scoring batches: rank 0 scores
    two of them, rank 1 one."""
    def scenario(world: World) -> dict[str, Tensor]:
        model = net()
        inputs, labels = data(1)
        examples = (inputs[0].repeat(2, 1, 1, 1)[:48], labels[0].repeat(2)[:48])
        pruner = Pruner(criterion=criterion, fisher_type=fisher_type, target_sparsity=0.5,
                        num_examples=48, batch_size=16)
        pruner.masks = Masks(prunable_layers(model), "unstructured")
        trainer = SimpleNamespace(
            model=model, task=Classification(),
            generator=torch.Generator().manual_seed(3),
            train_batches=lambda n, b: ((examples[0][i:i + b], examples[1][i:i + b])
                                        for i in range(0, n, b)))
        names = list(pruner.masks.layers)
        pruner._prune_step(trainer, 0.5, names, [pruner.masks.num_units(n) for n in names])
        return {f"mask.{n}": pruner.masks.alive(n).clone() for n in names}
    return scenario


SCENARIOS: dict[str, Scenario] = {
    "sgd": lambda world: train(world, lambda m: None),
    "kfac_1": kronecker(KFAC, 1.0),
    "kfac_half": kronecker(KFAC, 0.5),
    "kfac_eigen_half": kronecker(KFAC, 0.5, damping_mode="eigen"),
    "ekfac_1": kronecker(EKFAC, 1.0),
    "ekfac_half": kronecker(EKFAC, 0.5),
    "kfac_half_resumed": lambda world: train(
        world, lambda m: KFAC(m, cov_update_freq=1, inv_update_freq=3,
                              grad_worker_fraction=0.5), resume_at=4),
    "natural_gradient": lambda world: train(
        world, lambda m: NaturalGradient(m, cg_iters=5, damping=0.1), steps=4),
    "hessian_free": lambda world: train(
        world, lambda m: HessianFree(m, cg_iters=5, damping=0.1), steps=4),
    "tonga": lambda world: train(world, lambda m: TONGA(m, rank=2, refresh_interval=2), steps=6),
    "masks_obd": masks("obd", "mc"),
    "masks_kfac_empirical": masks("kfac", "empirical"),
    "masks_kfac_mc": masks("kfac", "mc"),
}


def run_all(world: World) -> dict[str, dict[str, Tensor]]:
    return {name: scenario(world) for name, scenario in SCENARIOS.items()}


def run_rank(rank: int, folder: str, port: int) -> None:
    """Entry of ``torch.multiprocessing.spawn``: join a gloo group of :data:`WORLD` ranks as
    ``torchrun`` would (its environment variables), run every scenario, save the results."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    try:
        torch.save(run_all(current()), Path(folder) / f"rank_{rank}.pt")
    finally:
        dist.destroy_process_group()
