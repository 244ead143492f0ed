"""Structured-config schemas and their registration with Hydra's ConfigStore.

Every option of a config group (``conf/<group>/<option>.yaml``) extends a schema registered
here under ``schema/<group>/<name>``::

    # conf/optimizer/kfac.yaml
    defaults:
      - /schema/optimizer/kfac@_here_
      - _self_

The schemas come from :data:`ngexp.options.REGISTRY`: a ``@configurable`` class or function
gives its signature (names, types, defaults) and its checks, from which a dataclass is made
here; a ``@schema`` dataclass is stored as it is. Hydra checks types and unknown keys while
composing; the range checks run in each dataclass's ``__post_init__`` when :func:`validate`
converts the config to objects. A YAML preset sets only what differs from its schema.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.plugins.config_source import ConfigSource
from omegaconf import MISSING, DictConfig, OmegaConf

from ngexp import plugins
from ngexp.errors import OptionError
from ngexp.hydra_compat import Store
from ngexp.options import (
    REGISTRY,
    Spec,
    check,
    check_choice,
    check_choices,
    check_integer,
    check_nonnegative,
    check_positive,
    choice_field,
    full_name,
)
from ngexp.targets import check_targets

if TYPE_CHECKING:
    from ngexp.distributed.world import World

#: Packages whose import registers schemas (each ``__init__`` imports its option modules).
SCHEMA_PACKAGES = ("ngexp.data", "ngexp.models", "ngexp.optim", "ngexp.train", "ngexp.prune",
                   "ngexp.instruments")
#: Types OmegaConf stores as they are.
PRIMITIVES = (int, float, bool, str)


@dataclass
class TrainerConfig:
    """The trainer's settings (``trainer.*``, :class:`ngexp.train.trainer.Trainer`). Training
    ends after ``epochs`` or ``max_steps``, whichever comes first."""

    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 1000
    eval_every: int = 0  # steps between evaluations; 0 = at the end of each epoch
    log_every: int = 50  # steps between train/ metric records
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # autocast; fp16 also scales the loss (torch.amp.GradScaler; ngexp/train/precision.py)
    precision: str = choice_field("fp32", ("fp32", "bf16", "fp16"))
    compile: bool = False
    channels_last: bool = False
    grad_clip: float | None = None  # global-norm clipping threshold
    checkpoint_every: int = 1  # epochs between checkpoints (and always at the end)
    # last.pt also every N steps and every M wall-clock minutes since the last write (0 = off;
    # docs/runs.md): a crash loses at most that much work, however long an epoch is
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 30.0
    deterministic: bool = False  # torch.use_deterministic_algorithms
    progress: str = choice_field("auto", ("auto", "rich", "plain", "none"))
    # data parallel (docs/distributed.md): batch_size is per process, the global batch is
    # batch_size x processes; devices = processes this command starts on this machine
    # (torch.distributed.run); under torchrun or a multi-task SLURM step the launcher decides
    devices: int = 1
    sync_bn: bool = False  # BatchNorm statistics over the global batch (SyncBatchNorm, CUDA)

    def __post_init__(self) -> None:
        check_integer("trainer.epochs", self.epochs, 1)
        check_integer("trainer.max_steps", self.max_steps, 1, allow_none=True)
        check_integer("trainer.batch_size", self.batch_size, 1)
        check_integer("trainer.eval_batch_size", self.eval_batch_size, 1)
        check_integer("trainer.eval_every", self.eval_every, 0)
        check_integer("trainer.log_every", self.log_every, 1)
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
              "trainer.device", self.device, "one of auto, cpu, cuda, cuda:N")
        check_choices(self, "trainer")
        check_positive("trainer.grad_clip", self.grad_clip, allow_none=True)
        check_integer("trainer.checkpoint_every", self.checkpoint_every, 1)
        check_integer("trainer.checkpoint_every_steps", self.checkpoint_every_steps, 0)
        check_nonnegative("trainer.checkpoint_every_minutes", self.checkpoint_every_minutes)
        check_integer("trainer.devices", self.devices, 1)


def group_field(default: Any, *, names_run: bool = False, list_valued: bool = False) -> Any:
    """A field of :class:`TrainConfig` that is a config group (``conf/<name>/``): ``names_run``
    when its choice is part of the run family's name, ``list_valued`` when the group takes a
    list of options (``logger=[tensorboard,csv]``) rather than one choice."""
    return field(default=default, metadata={"group": True, "names_run": names_run,
                                            "list_valued": list_valued})


@dataclass
class TrainConfig:
    """The whole run. Group nodes are typed ``Any`` here; each option brings its own schema.
    The group fields (:func:`group_field`) are the one list of config groups (:data:`GROUPS`),
    in the order of ``conf/train.yaml``'s defaults."""

    data: Any = group_field(MISSING, names_run=True)
    model: Any = group_field(MISSING, names_run=True)
    optimizer: Any = group_field(MISSING, names_run=True)
    lr_schedule: Any = group_field(MISSING)
    prune: Any = group_field(None, names_run=True)
    # name -> logger node (list-valued group: logger=[tensorboard,csv])
    logger: Any = group_field(None, list_valued=True)
    callbacks: Any = group_field(None, list_valued=True)  # callbacks=[early_stopping]
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    output_root: str = "results/runs"
    name: str | None = None  # run family name; default "<data>-<model>-<optimizer>[-<prune>]"
    init_from: str | None = None  # run dir or checkpoint whose model weights start this run
    resume: bool = True  # resume an interrupted run with the same config
    force: bool = False  # re-run even if a finished run with this config exists
    # what the run returns to a sweeper (ngexp/train/objective.py): a metric (null: val/acc, or
    # test/acc without a validation split), its final value or best evaluation, the direction
    objective: str | None = None
    objective_at: str = choice_field("final", ("final", "best"))
    objective_mode: str = choice_field("auto", ("auto", "min", "max"))

    def __post_init__(self) -> None:
        check_integer("seed", self.seed, 0)
        check(self.objective is None or (self.objective.count("/") >= 1
                                         and all(self.objective.split("/"))),
              "objective", self.objective, "null or a metric name such as val/loss, test/acc, "
              "train/loss")
        check_choice("objective_at", self.objective_at, ("final", "best"))
        check_choice("objective_mode", self.objective_mode, ("auto", "min", "max"))
        if self.name is not None:  # one folder inside output_root
            check(bool(self.name) and "/" not in self.name and "\\" not in self.name
                  and self.name not in (".", ".."), "name", self.name,
                  "a folder name inside output_root, without '/', '\\' or '..'")


#: The config groups of a run (``conf/<group>/``), in :class:`TrainConfig`'s order.
GROUPS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig)
                                if f.metadata.get("group"))
#: The groups of one choice each (a run's ``choices``: group -> option).
CHOICE_GROUPS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig)
                                       if f.metadata.get("group")
                                       and not f.metadata["list_valued"])
#: The groups that take a list of options (``logger=[tensorboard,csv]``).
LIST_GROUPS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig)
                                     if f.metadata.get("list_valued"))
#: The groups whose choices name a run family (``<data>-<model>-<optimizer>[-<prune>]``).
NAMING_GROUPS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig)
                                       if f.metadata.get("names_run"))


def config_type(annotation: Any) -> Any:
    """The OmegaConf field type for a Python annotation: primitives, ``X | None``, lists and
    fixed tuples of primitives as they are; anything else (a number or a schedule, a callable)
    ``Any``."""
    if annotation in PRIMITIVES or annotation is Any:
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return type(args[0])
    if origin in (typing.Union, types.UnionType):
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) == 1 and len(args) == 2 and config_type(rest[0]) is not Any:
            return typing.Optional[config_type(rest[0])]  # noqa: UP045  (OmegaConf needs it)
        return Any
    if origin in (list, Sequence, typing.Sequence) or (origin is tuple and args[-1:] == (...,)):
        item = args[0] if args else Any
        return list[item] if item in PRIMITIVES else Any
    if origin is tuple and all(arg in PRIMITIVES for arg in args):
        return annotation
    return Any


def schema_class(group: str, name: str, spec: Spec) -> type:
    """The dataclass schema of ``spec`` (see the module docstring)."""
    if spec.dataclass_schema is not None:
        spec.dataclass_schema.__schema_id__ = f"{group}/{name}"  # type: ignore[attr-defined]
        return spec.dataclass_schema
    fields: list[tuple[str, Any, Any]] = [("_target_", str,
                                           field(default=full_name(spec.target)))]
    for option in spec.options():
        default = MISSING if option.default is inspect.Parameter.empty else option.default
        if isinstance(default, (list, tuple, dict)):
            default = field(default_factory=lambda value=default: type(value)(value))
        else:
            default = field(default=default)
        fields.append((option.name, config_type(option.annotation), default))
    checks = spec.checks()
    names = [option.name for option in spec.options()]

    def __post_init__(self: Any) -> None:
        values = {key: getattr(self, key) for key in names}
        for run in checks:
            try:
                run(**values)
            except OptionError as error:
                raise OptionError(f"{group}.{error}") from None

    return dataclasses.make_dataclass(f"{group}_{name}_schema", fields,
                                      namespace={"__post_init__": __post_init__,
                                                 "__schema_id__": f"{group}/{name}"})


def register_all() -> None:
    """Import every package that declares schemas and every plugin (:mod:`ngexp.plugins`);
    store their schemas, the top-level schema and the plugins' options."""
    for package in SCHEMA_PACKAGES:
        importlib.import_module(package)
    loaded = plugins.load()
    store = Store()  # ConfigStore.instance(), clean on Hydra 1.3 and 1.4 (hydra_compat)
    for group, specs in REGISTRY.items():
        for name, spec in specs.items():
            store.store(group=f"schema/{group}", name=name, node=schema_class(group, name, spec))
    store.store(name="train_schema", node=TrainConfig)
    for group, found in plugin_options(loaded).items():
        for name, (node, package) in found.items():
            store.store(group=group, name=name, node=node, package=package)


def conf_dir() -> Path:
    """ngexp's config tree: shipped inside the package, or at the top of a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"ngexp's conf/ tree is missing next to {package}")


def schema_package(group: str, name: str) -> str:
    """Where an option puts its schema: the group node (``@_here_``), or in a list-valued group
    (``logger``, ``callbacks``) a node of the option's name."""
    return name if group in LIST_GROUPS else "_here_"


#: Group -> option -> ``(node, package)``.
PluginOptions = dict[str, dict[str, tuple[Any, str | None]]]


@cache
def plugin_options(loaded: tuple[plugins.Plugin, ...]) -> PluginOptions:
    """Group -> option -> ``(node, package)`` of the plugins' options: the presets of their
    ``conf/`` folders, then an option of each of their schemas that no preset has the name of
    (``defaults: [/schema/<group>/<name>@_here_, _self_]``). A name that ngexp's own
    ``conf/`` has already is a :class:`~ngexp.plugins.PluginError`."""
    found: PluginOptions = {}
    owners: dict[tuple[str, str], str] = {}

    def add(group: str, name: str, node: Any, package: str | None, owner: str) -> None:
        if (conf_dir() / group / f"{name}.yaml").is_file() or (group, name) in owners:
            other = owners.get((group, name), "ngexp")
            raise plugins.PluginError(f"{owner} adds {group}={name}, which {other} has "
                                      f"already; rename it")
        owners[(group, name)] = owner
        found.setdefault(group, {})[name] = (node, package)

    for plugin in loaded:
        for path in sorted(plugin.conf.rglob("*.yaml")) if plugin.conf else ():
            group = path.parent.relative_to(plugin.conf).as_posix()
            text = path.read_text(encoding="utf-8")
            package = ConfigSource._get_header_dict(text)["package"]
            add(group, path.stem, OmegaConf.create(text), package, f"plugin {plugin.module!r}")
    for group, specs in REGISTRY.items():
        for name, spec in specs.items():
            module = inspect.unwrap(spec.target).__module__
            if plugins.is_plugin_module(module) and name not in found.get(group, {}):
                node = {"defaults": [f"/schema/{group}/{name}@{schema_package(group, name)}",
                                     "_self_"]}
                add(group, name, node, None, f"plugin {module!r}")
    return found


def option_names(group: str) -> list[str]:
    """The options of config group ``group``: ngexp's presets and the plugins'."""
    folder = conf_dir() / group
    names = {path.stem for path in folder.glob("*.yaml")} if folder.is_dir() else set()
    return sorted(names | set(plugin_options(plugins.load()).get(group, {})))


def option_node(group: str, option: str) -> DictConfig:
    """The config of ``<group>=<option>`` as written (its defaults list unresolved)."""
    plugin = plugin_options(plugins.load()).get(group, {}).get(option)
    if plugin is not None:
        return OmegaConf.create(plugin[0])
    node = OmegaConf.load(conf_dir() / group / f"{option}.yaml")
    assert isinstance(node, DictConfig)
    return node


#: Keys that do not change what a run computes; left out of the run-directory hash.
NON_SEMANTIC_KEYS = (
    "output_root",
    "name",
    "resume",
    "force",
    "objective",  # what a sweeper optimizes, not what the run computes
    "objective_at",
    "objective_mode",
    "data.root",
    "data.download",
    "trainer.device",
    "trainer.log_every",
    "trainer.progress",
    "trainer.checkpoint_every",
    "trainer.checkpoint_every_steps",
    "trainer.checkpoint_every_minutes",
    "trainer.eval_batch_size",
    "trainer.devices",  # the world size enters through the global batch (semantic_config)
    "optimizer.grad_worker_fraction",  # where K-FAC's work runs, not what it computes
)


def validate(cfg: DictConfig) -> None:
    """Reject keys no schema declares (``+trainer.epoch=3``, ``+foo=1``: Hydra's ``+`` appends
    them past the schemas) and untrusted ``_target_``s (:mod:`ngexp.targets`), then instantiate
    every schema dataclass so each ``__post_init__`` range check runs."""
    check_keys(cfg)
    check_targets(cfg)
    OmegaConf.to_object(cfg)


def check_keys(node: DictConfig, path: str = "") -> None:
    """Raise :class:`OptionError` for the first key of a schema-typed node that is not one of
    its schema's fields (``hydra`` is Hydra's own)."""
    schema_type = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema_type):
        fields = [f.name for f in dataclasses.fields(schema_type)]
        for key in node:
            if key not in fields and not (key == "hydra" and not path):
                valid = ", ".join(name for name in fields if not name.startswith("_"))
                raise OptionError(f"{path + '.' if path else ''}{key}: {key!r} is not a key of "
                                  f"{path or 'the run config'}; valid keys: {valid}")
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not (key == "hydra" and not path):
            check_keys(child, f"{path}.{key}" if path else str(key))


def semantic_config(cfg: DictConfig, world_size: int = 1) -> dict[str, Any]:
    """Resolved config as a plain dict without :data:`NON_SEMANTIC_KEYS` and ``seed``; for a
    run of ``world_size``
    processes ``trainer.batch_size`` is the global batch, so the world size does not matter
    as long as the global batch is the same."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    container.pop("seed", None)
    for dotted in NON_SEMANTIC_KEYS:
        node: Any = container
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node.pop(leaf)
    trainer = container.get("trainer")
    if world_size > 1 and isinstance(trainer, dict) and "batch_size" in trainer:
        trainer["batch_size"] *= world_size
    return container


def check_world(cfg: DictConfig, world: World, launched: bool) -> None:
    """Raise :class:`OptionError` for settings that do not fit a run of ``world.size``
    processes (``launched``: started by torchrun/SLURM, else by ``trainer.devices``): a device
    naming one GPU, SyncBatchNorm without CUDA, too few GPUs, K-FAC's
    ``grad_worker_fraction``, or ``trainer.devices`` under a launcher that started another
    number of processes."""
    from ngexp.distributed.world import device_type  # torch: not needed to compose configs

    trainer = cfg.trainer
    if launched:
        check(trainer.devices in (1, world.local_size), "trainer.devices", trainer.devices,
              f"1 under a launcher (it started {world.local_size} processes on this machine)")
    if not world.distributed:
        return
    check(trainer.device in ("auto", "cpu", "cuda"), "trainer.device", trainer.device,
          f"auto, cpu or cuda with {world.size} processes (each uses cuda:LOCAL_RANK)")
    cuda = device_type(trainer.device) == "cuda"
    check(cuda or not trainer.sync_bn, "trainer.sync_bn", trainer.sync_bn,
          "false on the CPU (torch's SyncBatchNorm runs on GPUs only)")
    if cuda and not launched:
        import torch

        check(world.local_size <= torch.cuda.device_count(), "trainer.devices",
              trainer.devices, f"at most the {torch.cuda.device_count()} visible CUDA devices")
    fraction = cfg.optimizer.get("grad_worker_fraction") if cfg.get("optimizer") else None
    if fraction is not None:
        from ngexp.optim.kaisa import grad_worker_count

        try:
            grad_worker_count(world.size, fraction)
        except OptionError as error:
            raise OptionError(f"optimizer.{error}") from None
