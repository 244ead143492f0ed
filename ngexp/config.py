"""Structured-config schemas and their registration with Hydra's ConfigStore.

Every option of a config group (``conf/<group>/<option>.yaml``) extends a dataclass schema
registered here under ``schema/<group>/<option>``::

    # conf/optimizer/kfac.yaml
    defaults:
      - /schema/optimizer/kfac@_here_
      - _self_
    lr: 0.01

Schemas live next to the code they configure and are registered with the ``@schema`` decorator.
Hydra checks types and unknown keys while composing; range checks live in each dataclass's
``__post_init__`` and run when :func:`validate` converts the config to objects.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

T = TypeVar("T")

#: Packages whose import registers schemas (each ``__init__`` imports its option modules).
SCHEMA_PACKAGES = ("ngexp.data", "ngexp.models", "ngexp.optim", "ngexp.train", "ngexp.prune")

_SCHEMAS: dict[str, dict[str, type]] = {}


def schema(group: str, name: str) -> Callable[[type[T]], type[T]]:
    """Register a dataclass as the schema of option ``name`` in config group ``group``."""

    def register(cls: type[T]) -> type[T]:
        ConfigStore.instance().store(group=f"schema/{group}", name=name, node=cls)
        _SCHEMAS.setdefault(group, {})[name] = cls
        return cls

    return register


def register_all() -> None:
    """Import every package that declares schemas and store the top-level schema."""
    for package in SCHEMA_PACKAGES:
        importlib.import_module(package)
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def check(condition: bool, key: str, value: Any, expected: str) -> None:
    """Raise a one-line ``ValueError`` naming ``key``, the bad ``value`` and what is valid."""
    if not condition:
        raise ValueError(f"{key}={value!r} is invalid: expected {expected}")


def check_choice(key: str, value: Any, choices: tuple[Any, ...]) -> None:
    check(value in choices, key, value, "one of " + ", ".join(map(str, choices)))


@dataclass
class TrainerConfig:
    """Engine settings. ``max_steps`` (when set) overrides ``epochs``."""

    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 1000
    eval_every: int = 0  # steps between evaluations; 0 = at the end of each epoch
    log_every: int = 50  # steps between train/ metric records
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast on CUDA)
    compile: bool = False
    channels_last: bool = False
    grad_clip: float | None = None  # global-norm clipping threshold
    checkpoint_every: int = 1  # epochs between checkpoints (and always at the end)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    progress: str = "auto"  # auto | rich | plain | none

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "trainer.epochs", self.epochs, "an integer >= 1")
        check(self.max_steps is None or self.max_steps >= 1, "trainer.max_steps",
              self.max_steps, "null or an integer >= 1")
        check(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "an integer >= 1")
        check(self.eval_batch_size >= 1, "trainer.eval_batch_size", self.eval_batch_size,
              "an integer >= 1")
        check(self.eval_every >= 0, "trainer.eval_every", self.eval_every, "an integer >= 0")
        check(self.log_every >= 1, "trainer.log_every", self.log_every, "an integer >= 1")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
              "trainer.device", self.device, "one of auto, cpu, cuda, cuda:N")
        check_choice("trainer.precision", self.precision, ("fp32", "bf16"))
        check(self.grad_clip is None or self.grad_clip > 0, "trainer.grad_clip",
              self.grad_clip, "null or a number > 0")
        check(self.checkpoint_every >= 1, "trainer.checkpoint_every", self.checkpoint_every,
              "an integer >= 1")
        check_choice("trainer.progress", self.progress, ("auto", "rich", "plain", "none"))


@dataclass
class TrainConfig:
    """The whole run. Group nodes are typed ``Any`` here; each option brings its own schema."""

    model: Any = MISSING
    optimizer: Any = MISSING
    data: Any = MISSING
    lr_schedule: Any = MISSING
    prune: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    output_root: str = "results/runs"
    name: str | None = None  # run family name; default "<data>-<model>-<optimizer>[-<prune>]"
    init_from: str | None = None  # run dir or checkpoint whose model weights start this run
    resume: bool = True  # resume an interrupted run with the same config
    force: bool = False  # re-run even if a finished run with this config exists

    def __post_init__(self) -> None:
        check(self.seed >= 0, "seed", self.seed, "an integer >= 0")


#: Keys that do not change what a run computes; left out of the run-directory hash.
NON_SEMANTIC_KEYS = (
    "output_root",
    "name",
    "resume",
    "force",
    "data.root",
    "data.download",
    "trainer.device",
    "trainer.log_every",
    "trainer.progress",
    "trainer.checkpoint_every",
    "trainer.eval_batch_size",
)


def validate(cfg: DictConfig) -> None:
    """Instantiate every schema dataclass so each ``__post_init__`` range check runs."""
    OmegaConf.to_object(cfg)


def semantic_config(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as a plain dict without :data:`NON_SEMANTIC_KEYS` and ``seed``."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    container.pop("seed", None)
    for dotted in NON_SEMANTIC_KEYS:
        node: Any = container
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return container
