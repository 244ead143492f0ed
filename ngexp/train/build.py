"""Building a run from its composed config: world, seeds, data, model, callbacks, optimizer,
schedule and loggers, in that order (:func:`build_run`), into one :class:`Run`.

Bad input fails here, before anything is written: building validates data, model and
optimizer together. Data-parallel, every rank builds the same run; training goes through
``DistributedDataParallel`` and evaluation through the model itself.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ngexp.callbacks import Callback
from ngexp.config import TrainerConfig, check_world
from ngexp.curvature.tasks import Task, build_task
from ngexp.data.bundle import DataBundle
from ngexp.distributed.world import World, join, launched_world
from ngexp.errors import UserError
from ngexp.models import build_model
from ngexp.optim.build import build_optimizer
from ngexp.optim.training import TrainingOptimizer
from ngexp.targets import instantiate
from ngexp.train.checkpoint import init_weights
from ngexp.train.loggers import Logger, MetricsFile, build_loggers
from ngexp.train.precision import autocast, grad_scaler


@dataclass(eq=False)
class Run:
    """What one run is made of. The fields after ``callbacks`` are built once the callbacks
    have seen the model (``on_model_built`` gets the run as it is then: no ``optimizer`` yet).
    """

    cfg: DictConfig
    #: ``cfg.trainer`` as a plain dataclass, read once: DictConfig attribute access costs
    #: ~20 us per read, which the per-step path would pay several times per step.
    settings: TrainerConfig
    choices: dict[str, str | None]
    run_dir: Path
    console: Console
    world: World
    device: torch.device
    generator: torch.Generator
    data: DataBundle
    model: nn.Module
    task: Task
    callbacks: list[Callback]
    optimizer: TrainingOptimizer = field(init=False)
    #: The training forward (compiled and/or DDP); the steps whose forward a preconditioner
    #: captures (its statistics, its batch) run ``eager``, whose hooks then record.
    forward: Callable[[Tensor], Tensor] = field(init=False)
    eager: nn.Module = field(init=False)
    #: Evaluation's forward: this rank's model, without DDP (compiled when training is).
    eval_forward: Callable[[Tensor], Tensor] = field(init=False)
    global_batch: int = field(init=False)
    steps_per_epoch: int = field(init=False)
    #: ``trainer.epochs`` or ``trainer.max_steps`` steps, whichever comes first.
    total_steps: int = field(init=False)
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    loggers: list[Logger] = field(init=False)  # rank 0's; metrics.jsonl first
    params: list[nn.Parameter] = field(init=False)  # the trained parameters (clipping)

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.settings.precision, self.device)

    def memory_format(self, inputs: Tensor) -> Tensor:
        """Image batches ``(n, c, h, w)`` in channels-last memory with ``trainer.channels_last``."""
        if self.settings.channels_last and inputs.ndim == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs


def join_world(cfg: DictConfig) -> World:
    """Check the settings against the launched world, then join it (data-parallel: the process
    group)."""
    launched = launched_world()
    check_world(cfg, launched, launched.distributed)
    return join(cfg.trainer.device)


def run_console(world: World, console: Console | None) -> Console:
    """Rank 0 speaks for the run; the other ranks' console is quiet."""
    return (console or Console(soft_wrap=True)) if world.is_main else Console(quiet=True)


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """The device of ``trainer.device``; data-parallel, ``cuda`` is ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name!r} but CUDA is not available; choices: auto, cpu")
    if world is not None and world.distributed and name == "cuda":
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; set deterministic algorithms either way (an earlier run in
    this process, a sweep, must not leak its choice)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic)
    if deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS's deterministic mode


def build_run(cfg: DictConfig, choices: Mapping[str, str | None], run_dir: Path,
              console: Console | None = None, world: World | None = None) -> Run:
    """Everything the run of ``cfg`` trains with (``world``: joined already, else here)."""
    settings = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    world = join_world(cfg) if world is None else world
    device = resolve_device(settings.device, world)
    seed_everything(cfg.seed, settings.deterministic)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    data = instantiate(cfg.data, key="data", _partial_=True)().to(device)
    model = build_model(cfg.model, data.spec)
    if settings.sync_bn and world.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    task = build_task(getattr(model, "task", data.spec.task))
    if cfg.init_from:
        load_init_weights(model, cfg.init_from)
    callbacks: list[Callback] = [instantiate(node, key=f"callbacks.{name}", _partial_=True)()
                                 for name, node in (cfg.get("callbacks") or {}).items()]
    if cfg.get("prune"):
        callbacks.append(instantiate(cfg.prune, key="prune", _partial_=True)())
    run = Run(cfg, settings, dict(choices), run_dir, run_console(world, console), world,
              device, generator, data, model, task, callbacks)
    for callback in callbacks:  # e.g. variational gates: parameters to train
        callback.on_model_built(run)
    run.optimizer = build_optimizer(cfg.optimizer, model, task,
                                    grad_scaler(settings.precision, device))
    build_forwards(run)
    build_schedule(run)
    run.loggers = [MetricsFile(), *build_loggers(cfg.get("logger") or {})] if world.is_main \
        else []
    run.params = [p for p in model.parameters() if p.requires_grad]
    return run


def build_forwards(run: Run) -> None:
    """The training, captured-step and evaluation forwards (compiled with
    ``trainer.compile``; data-parallel, training runs through DDP)."""
    compiled = torch.compile(run.model) if run.settings.compile else run.model
    run.forward, run.eager, run.eval_forward = compiled, run.model, compiled
    if run.world.distributed:
        device = run.device
        run.eager = DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)
        run.forward = torch.compile(run.eager) if run.settings.compile else run.eager


def build_schedule(run: Run) -> None:
    """The run's length in steps and its learning-rate schedule."""
    settings, world, examples = run.settings, run.world, len(run.data.train)
    run.global_batch = settings.batch_size * world.size
    run.steps_per_epoch = examples // run.global_batch
    if run.steps_per_epoch == 0:
        processes = f" x {world.size} processes" if world.distributed else ""
        raise UserError(f"trainer.batch_size={settings.batch_size}{processes} is larger than "
                        f"the {examples} training examples; choose at most "
                        f"{examples // world.size}")
    run.total_steps = min(settings.max_steps or math.inf,
                          settings.epochs * run.steps_per_epoch)
    multiplier = instantiate(run.cfg.lr_schedule, key="lr_schedule", _partial_=True)(
        total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer.optimizer, multiplier)


def load_init_weights(model: nn.Module, location: str) -> None:
    """Start ``model`` from the weights of ``init_from``, which must fit its architecture."""
    weights = init_weights(location)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{key} {tuple(weights[key].shape)} vs {tuple(value.shape)}"
              for key, value in own.items() if key in weights and weights[key].shape != value.shape]
    if missing or unexpected or shapes:
        details = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"shapes differ: {', '.join(shapes[:2])}" if shapes else "") if part)
        raise UserError(f"init_from={location!r} holds weights of another architecture "
                        f"({details}); give a checkpoint of the same model and data shape")
    model.load_state_dict(weights)
