"""Command line: ``ngexp train`` (Hydra app, single run or ``-m`` sweep) and ``ngexp report``.

Before Hydra launches anything, every value of the command line (each value of a sweep, and the
sweep parameters of an experiment file) is composed and validated against the schemas, so a
bad value fails at once with one line naming the key, the value and the valid choices.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ngexp.config import conf_dir
from ngexp.errors import OptionError, UserError
from ngexp.hydra_compat import VERSION_BASE, plugin_mismatch
from ngexp.options import check

COMMANDS = {
    "train": "train one run, or a sweep with -m, composed from the config groups",
    "report": "aggregate run directories into tables (console, Markdown, CSV) and plots",
}
#: Groups of the command line besides the run config's (:data:`ngexp.config.GROUPS`).
EXTRA_GROUPS = ("experiment", "hydra/launcher")
#: Launcher presets and the plugin each needs.
LAUNCHER_PLUGINS = {"joblib": "parallel", "submitit_slurm": "slurm", "submitit_local": "slurm"}
#: Sweeper plugins and the extra that brings each.
SWEEPER_PLUGINS = {"optuna": "tune"}


def error_line(message: str) -> int:
    """Print ``ngexp: error: MESSAGE`` (once per run: a data-parallel run's rank 0 alone)."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) in ("0", ""):
        print(f"ngexp: error: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- help
def options(group: str) -> list[str]:
    """The options of ``group``: ngexp's presets and the plugins' (:mod:`ngexp.plugins`)."""
    from ngexp.config import option_names

    return option_names(group)


#: The kind of example (``DataSpec.kind``) each data schema yields.
DATA_SCHEMA_KINDS = {"image": "image", "synthetic": "image", "sequence": "sequence",
                     "text": "tokens"}


def fitting_data(kinds: Iterable[str]) -> list[str]:
    """The ``data=`` options whose examples are of one of ``kinds``."""
    found = []
    for option in options("data"):
        if DATA_SCHEMA_KINDS.get(schema_of("data", option) or "") in set(kinds):
            found.append(option)
    return found


def default_choices() -> dict[str, str]:
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.load(conf_dir() / "train.yaml")).get("defaults", [])
    return {key: str(value) for item in defaults if isinstance(item, dict)
            for key, value in item.items()}


def schema_of(group: str, option: str) -> str | None:
    """The schema a ``conf/<group>/<option>.yaml`` extends: ``kfac`` for a defaults entry
    ``/schema/optimizer/kfac@_here_``."""
    from ngexp.config import option_node

    for item in option_node(group, option).get("defaults", []):
        if str(item).startswith(f"/schema/{group}/"):
            return str(item).removeprefix(f"/schema/{group}/").split("@")[0]
    return None


def setting_text(name: str, option: Any) -> str:
    """``lr=0.03`` or ``base={sgd*|adam|rmsprop}`` (default starred) for one option."""
    import inspect

    default = option.default
    if option.choices is not None and not all(isinstance(c, bool) for c in option.choices):
        return f"{name}={{{'|'.join(f'{c}*' if c == default else str(c) for c in option.choices)}}}"
    if default is inspect.Parameter.empty:
        return f"{name}=???"
    shown = "null" if default is None else str(default).lower() if isinstance(default, bool) \
        else str(list(default)) if isinstance(default, tuple) else str(default)
    return f"{name}={shown}"


def wrapped(items: list[str], indent: str = "    ", width: int = 96) -> list[str]:
    lines, line = [], indent
    for item in items:
        if len(line) + len(item) + 2 > width and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += item + "  "
    return [*lines, line.rstrip()] if line.strip() else lines


def train_help() -> str:
    """Every group, option and setting, generated from the schemas (nothing listed by hand)."""
    import dataclasses

    from hydra import compose, initialize_config_dir

    from ngexp.config import GROUPS, LIST_GROUPS, TrainConfig, TrainerConfig, register_all
    from ngexp.options import REGISTRY, dataclass_options

    register_all()
    groups = (*GROUPS, *EXTRA_GROUPS)
    defaults = default_choices()
    lines = ["usage: ngexp train [-m] [GROUP=OPTION ...] [KEY=VALUE ...]", "",
             "Config groups (GROUP=OPTION; default marked *; prune is off unless chosen; "
             "logger and callbacks take lists, e.g. logger=[tensorboard,csv]):"]
    for group in groups:
        names = [f"{name}*" if name == defaults.get(group) else name for name in options(group)]
        if group == "hydra/launcher":
            names = ["basic*", *names]
        prefix = "+" if group == "experiment" else ""
        lines.append(f"  {prefix + group + ':':<16} {', '.join(names) or '-'}")
    lines += ["", "Run settings (KEY=VALUE, defaults shown, choices in {}):"]
    with initialize_config_dir(str(conf_dir()), **VERSION_BASE):
        cfg = compose("train")  # conf/train.yaml sets some run defaults (trainer.epochs ...)
    top = [setting_text(o.name, dataclasses.replace(o, default=cfg[o.name]))
           for o in dataclass_options(TrainConfig) if o.name not in GROUPS and o.name != "trainer"]
    lines += wrapped(top, "  ")
    lines += wrapped([setting_text(f"trainer.{o.name}",
                                   dataclasses.replace(o, default=cfg.trainer[o.name]))
                      for o in dataclass_options(TrainerConfig)], "  ")
    lines += ["", "Settings of each group's options (GROUP.KEY=VALUE; the option's own values "
              "may differ from these defaults, see: ngexp train GROUP=OPTION --cfg job):"]
    for group in groups:
        for name, spec in REGISTRY.get(group, {}).items():
            users = [o for o in options(group) if schema_of(group, o) == name]
            if not users:
                continue
            lines.append(f"  {group}={','.join(users)}:")
            node = group  # a list-valued group holds each option under its name
            if group in LIST_GROUPS:
                node = f"{group}.{users[0] if len(users) == 1 else 'OPTION'}"
            items = [setting_text(f"{node}.{o.name}", o) for o in spec.options()]
            lines += wrapped(items) if items else ["    (no settings)"]
    lines += ["", "Examples:", "  ngexp train optimizer=kfac model=lenet5",
              "  ngexp train optimizer=kfac optimizer.base=adam optimizer.lr=1e-3",
              "  ngexp train -m optimizer=sgd,kfac,ekfac seed=0,1,2",
              "  ngexp train -m +experiment=autoencoder_sgd,autoencoder_kfac,autoencoder_ekfac",
              "  ngexp train logger=[tensorboard,csv] callbacks=[early_stopping]",
              "Data are looked for in data.root, $NGEXP_DATA, ./data and Debian's "
              "/usr/share/datasets.",
              "Hydra's own flags (--cfg, --info, --multirun ...): ngexp train --hydra-help"]
    return "\n".join(lines)


def hydra_help() -> str:
    """Hydra's flags as they apply to ngexp (Hydra's generic help would list internal
    ``schema/*`` groups)."""
    return "\n".join([
        "ngexp train runs on Hydra (https://hydra.cc); the flags and keys that apply:", "",
        "  -m, --multirun          a sweep: every combination of comma-separated values",
        "  --cfg job|hydra|all     print the composed config (job: ngexp's) instead of running",
        "  --package PKG           with --cfg: only that part, e.g. --package optimizer",
        "  --resolve               with --cfg: resolve interpolations",
        "  --info [searchpath|defaults|defaults-tree|config|plugins]",
        "                          how the config was composed",
        "  hydra.run.dir=DIR       train in DIR instead of <output_root>/<name>/<hash>/seed_<s>",
        "  hydra.sweep.dir=DIR     where a sweep keeps its job folders (default "
        "<output_root>/sweeps/<time>)",
        "  hydra/launcher=parallel|slurm",
        "                          run a sweep's jobs with joblib or SLURM (pip install "
        "'ngexp[sweep]')",
        "  hydra.launcher.KEY=V    the launcher's settings (n_jobs, partition, timeout_min ...)",
        "", "Every run directory holds .hydra/ (config.yaml, hydra.yaml, overrides.yaml) and "
        "train.log.", "ngexp's own groups and settings: ngexp train --help"])


def top_help() -> str:
    lines = ["usage: ngexp <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "ngexp <command> --help shows a command's options."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- validation
def describe(error: BaseException, overrides: Iterable[str]) -> str:
    """One line for a composition/validation error: key, bad value and valid choices."""
    from hydra.errors import MissingConfigException

    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        if group == "hydra/launcher" and option in LAUNCHER_PLUGINS:
            return (f"hydra/launcher={LAUNCHER_PLUGINS[option]} needs Hydra's {option} launcher "
                    f"plugin: pip install 'ngexp[sweep]'")
        if group == "hydra/sweeper" and option in SWEEPER_PLUGINS:
            return (f"hydra/sweeper={option} needs Hydra's {option} sweeper plugin: pip install "
                    f"'ngexp[{SWEEPER_PLUGINS[option]}]'")
        return (f"{group}={option!r} is not an option of '{group}'; choices: "
                f"{', '.join(sorted(error.options or options(group)))}")
    cause = error.__cause__ or error
    message = str(error).strip().splitlines()[0]
    if "Could not override" in message:
        key = message.split("'")[1]
        parent, _, leaf = key.rpartition(".")
        valid = known_keys(parent, [o for o in overrides if not o.startswith(key + "=")])
        if valid is None:
            return (f"{key}: {parent} is a value, not a node; to give it a schedule, set the "
                    f"whole node: '{parent}={{_target_: ..., ...}}'")
        return f"{key}: {leaf!r} is not a key of {parent or 'the run config'}; valid keys: {valid}"
    if cause is not error:
        failing = message.removeprefix("Error merging override ").strip()
        return f"{failing}: {str(cause).strip().splitlines()[0]}"
    return message


def known_keys(node: str, overrides: list[str]) -> str | None:
    """Comma-separated keys of config node ``node`` (dotted; '' = top level); ``None`` when
    ``node`` is a value."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, OmegaConf

    with initialize_config_dir(str(conf_dir()), **VERSION_BASE):
        cfg = compose("train", overrides=sweep_variants(overrides)[0])
    selected = OmegaConf.select(cfg, node) if node else cfg
    if selected is not None and not isinstance(selected, DictConfig):
        return None
    keys = [k for k in selected.keys() if not str(k).startswith("_")] if selected else []
    return ", ".join(map(str, keys)) or "none"


def sweep_values(override: Any) -> list[str]:
    """The values of a sweep to validate: each of a ``choice``/``range``; the two ends of an
    ``interval`` (a sampler's search space: ``interval(0.01,0.2)``, ``tag(log, interval(...))``,
    ``int(interval(...))``), which must be ordered, and positive on a log scale."""
    from hydra.core.override_parser.types import IntervalSweep

    sweep = override.value()
    if not isinstance(sweep, IntervalSweep):
        return list(override.sweep_string_iterator())
    text = override.input_line
    if not sweep.start < sweep.end:
        raise OptionError(f"{text}: the interval's lower end must be below its upper end")
    if "log" in sweep.tags and sweep.start <= 0:
        raise OptionError(f"{text}: a log-scale interval needs a lower end > 0")
    return [repr(sweep.start), repr(sweep.end)]


def real_intervals(overrides: list[str]) -> dict[str, str]:
    """Keys swept over an interval of real numbers (not ``int(interval(...))``), by override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.get_key_element().lstrip("+~"): o.input_line for o in parsed
            if isinstance(o.value(), IntervalSweep) and isinstance(o.value().start, float)}


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """Override lists that together use every value of every sweep once (for an interval, its
    two ends: :func:`sweep_values`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    base: list[str] = []
    sweeps: list[tuple[int, str, list[str]]] = []
    for override in parsed:
        if override.is_sweep_override():
            key = override.input_line.split("=", 1)[0]
            values = sweep_values(override)
            sweeps.append((len(base), key, values[1:]))
            base.append(f"{key}={values[0]}")
        else:
            base.append(override.input_line)
    variants = [base]
    for index, key, values in sweeps:
        for value in values:
            variant = list(base)
            variant[index] = f"{key}={value}"
            variants.append(variant)
    return variants


def defer_group_keys(overrides: list[str]) -> list[str]:
    """In a sweep over a group (``prune=a,b``), turn its keys (``prune.steps=14``) into
    one-value sweeps (``prune.steps=choice(14)``): Hydra composes a multirun's base config
    without the sweeps, where the group may be unset, so the keys apply in each job instead."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}
    result = []
    for override, text in zip(parsed, overrides, strict=True):
        key, _, value = text.partition("=")
        if not override.is_sweep_override() and key.split(".")[0] in swept and "." in key:
            text = f"{key}=choice({value})"
        result.append(text)
    return result


def validate_overrides(overrides: list[str], source: ConfigSource | None = None) -> None:
    """Compose (from ``source``: ngexp's ``train`` by default) and validate each sweep variant;
    raises on the first bad value."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from ngexp.config import check_world, register_all, validate
    from ngexp.distributed.world import World, launched_world
    from ngexp.targets import check_hydra_targets

    register_all()
    launched = launched_world()
    source = source or ConfigSource(conf_dir())
    with initialize_config_dir(str(source.path), **VERSION_BASE):
        pending = sweep_variants(overrides)
        intervals = real_intervals(overrides)
        checked_sweeper, sweeper = False, {}
        while pending:
            variant = pending.pop(0)
            try:
                cfg = compose(source.name, overrides=source.search_path(variant),
                              return_hydra_config=True)
            except Exception as error:
                message = f"{error} {error.__cause__}"
                for key, text in intervals.items():
                    if f"{key}=" in message and "Integer" in message:
                        raise OptionError(f"{text}: {key} is an integer but interval(...) samples "
                                          f"real numbers; use int(interval(...))") from None
                raise
            check_hydra_targets(cfg.hydra)
            if not checked_sweeper:  # sweep parameters set by an experiment file
                checked_sweeper = True
                params = cfg.hydra.sweeper.get("params") or {}
                extra = [f"{k}={v}" for k, v in params.items()]
                if extra:
                    pending += sweep_variants(variant + extra)
                    intervals.update(real_intervals(extra))
                sweeper = cfg.hydra.sweeper
                mismatch = plugin_mismatch(sweeper.get("_target_"))  # Hydra 1.3/1.4
                if mismatch is not None:
                    raise OptionError(mismatch)
            with open_dict(cfg):
                del cfg["hydra"]
            validate(cfg)
            check_sweeper_direction(sweeper_direction(sweeper), cfg)
            devices = cfg.trainer.devices
            check_world(cfg, launched if launched.distributed else World(0, devices, 0, devices),
                        launched.distributed)


def sweeper_direction(sweeper: Any) -> Any:
    """What an optimizing sweeper does with the returned value: Optuna's ``direction``
    (``minimize``/``maximize``, an enum, or a list for several objectives), Nevergrad's
    ``optim.maximize``, Ax's ``ax_config.experiment.minimize``; ``None`` for a sweeper that
    does not optimize (the basic grid)."""
    from omegaconf import DictConfig

    def node(parent: Any, key: str) -> Any:
        return parent.get(key) if isinstance(parent, (dict, DictConfig)) else None

    if node(sweeper, "direction") is not None:
        return sweeper.get("direction")
    if node(node(sweeper, "optim"), "maximize") is not None:
        return "maximize" if sweeper.optim.maximize else "minimize"
    minimize = node(node(node(sweeper, "ax_config"), "experiment"), "minimize")
    return None if minimize is None else ("minimize" if minimize else "maximize")


def check_sweeper_direction(direction: Any, cfg: Any) -> None:
    """A sweeper that optimizes (:func:`sweeper_direction`) gets one objective, named
    (``objective=...``), whose direction is the sweeper's: ngexp cannot know before a run
    whether the default metric is an accuracy or a loss, and a sweeper that minimizes an
    accuracy would be silently wrong."""
    from omegaconf import ListConfig

    from ngexp.train.objective import minimizes

    if direction is None:
        return
    if isinstance(direction, (list, ListConfig)):
        check(len(direction) == 1, "hydra.sweeper.direction", list(direction),
              "one direction (an ngexp run returns one objective)")
        direction = direction[0]
    direction = getattr(direction, "name", direction)  # an enum (Optuna's Direction) or a str
    check(cfg.objective is not None, "objective", None,
          f"a metric for the sweeper to {direction} (e.g. objective=val/loss, objective=test/acc)")
    wanted = "minimize" if minimizes(cfg.objective, cfg.objective_mode) else "maximize"
    check(str(direction).lower() == wanted, "the sweeper's direction", direction,
          f"{wanted} for objective={cfg.objective} (objective_mode={cfg.objective_mode}; "
          f"Optuna: hydra.sweeper.direction, Nevergrad: hydra.sweeper.optim.maximize, Ax: "
          f"hydra.sweeper.ax_config.experiment.minimize)")


# --------------------------------------------------------------------------- train
def run_hydra(args: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig, OmegaConf, open_dict

    from ngexp.config import CHOICE_GROUPS, register_all, validate
    from ngexp.distributed.world import launched_world
    from ngexp.errors import IncompatibleData, UserError
    from ngexp.train import rundir
    from ngexp.train.rundir import RunWriteError
    from ngexp.train.session import train
    from ngexp.train.stop import RunInterrupted

    def task(cfg: DictConfig) -> float:
        """One run; returns its objective (:mod:`ngexp.train.objective`) for a sweeper."""
        runtime = HydraConfig.get()
        choices = {group: runtime.runtime.choices.get(group) for group in CHOICE_GROUPS}
        multirun = runtime.mode == RunMode.MULTIRUN
        try:  # again here: a config from --config-dir/-cp was not validated beforehand
            validate(cfg)
        except UserError as error:
            if multirun:
                raise
            raise SystemExit(error_line(str(error))) from None
        job_dir = Path(runtime.runtime.output_dir) if multirun else None
        hydra_files = {"config.yaml": OmegaConf.to_yaml(cfg),
                       "hydra.yaml": OmegaConf.to_yaml(runtime),
                       "overrides.yaml": OmegaConf.to_yaml(list(runtime.overrides.task))}
        run_dir = None  # hydra.run.dir=DIR given: train there instead of the hashed layout
        if not multirun and any(o.startswith("hydra.run.dir=") for o in runtime.overrides.hydra):
            run_dir = Path(runtime.run.dir)
        launched = launched_world().distributed
        if cfg.trainer.devices > 1 and not launched:  # this job as N processes (torchrun)
            launch_job(cfg, choices, runtime, job_dir, multirun)
            return run_objective(cfg, None, rundir.run_directory(cfg, choices,
                                                                 cfg.trainer.devices))
        if multirun and cfg.trainer.device == "auto" and not launched:  # one GPU per job
            from ngexp.train.devices import assign_device

            with open_dict(cfg):
                cfg.trainer.device = assign_device(runtime.job.num)
        try:
            summary = train(cfg, choices, Console(soft_wrap=True), job_dir, run_dir=run_dir,
                            hydra_files=hydra_files)
        except RunWriteError as error:  # the run ended failed(io: ...); its summary says so
            if multirun:
                raise
            error_line(str(error))
            raise SystemExit(1) from None
        except IncompatibleData as error:
            message = (f"model={choices.get('model')} does not fit data={choices.get('data')}: "
                       f"{error}; data sets that fit: {', '.join(fitting_data(error.kinds))}")
            if multirun:
                raise UserError(message) from None
            raise SystemExit(error_line(message)) from None
        except UserError as error:
            if multirun:
                raise
            raise SystemExit(error_line(str(error))) from None
        except RunInterrupted:
            raise KeyboardInterrupt from None
        except Exception as error:  # the run's summary says failed(...); a sweep goes on
            if not multirun:
                raise
            logging.getLogger("ngexp").warning("job %s failed (%s: %s); its objective is the "
                                               "worst value", runtime.job.num,
                                               type(error).__name__, error)
            summary = {"status": "failed"}
        if summary is not None and summary["status"] == "failed" and not multirun:
            raise SystemExit(1)  # a diverged job does not stop a sweep
        return run_objective(cfg, summary, run_dir or rundir.run_directory(cfg, choices))

    register_all()
    configure_logging()
    app = hydra.main(config_path=str(conf_dir()), config_name="train", **VERSION_BASE)(task)
    saved = sys.argv
    sys.argv = ["ngexp train", *args]
    try:
        app()
    except KeyboardInterrupt:
        return 130
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return 0


def run_objective(cfg: Any, summary: dict[str, Any] | None, run_dir: Path) -> float:
    """The objective of the run of ``cfg``: from ``summary``, else (a finished run skipped, or
    one trained by worker processes) from the summary in ``run_dir``."""
    from ngexp.train.objective import objective_value
    from ngexp.train.rundir import read_summary

    if summary is None:
        summary = read_summary(run_dir)
    return objective_value(summary, cfg.objective, cfg.objective_at, cfg.objective_mode)


def launch_job(cfg: Any, choices: dict[str, str | None], runtime: Any, job_dir: Path | None,
               multirun: bool) -> None:
    """Run this job as ``trainer.devices`` processes (:func:`ngexp.distributed.launch.
    launch_local`): each a single run of the job's overrides, rank 0 writing its run directory.
    The job's exit code is the processes' (a failed run does not stop a sweep)."""
    from ngexp.distributed.launch import INTERRUPTED, launch_local
    from ngexp.train import rundir

    overrides = [*runtime.overrides.task,
                 *(o for o in runtime.overrides.hydra if o.startswith("hydra.run.dir="))]
    # the sweep's pointer, as train() writes it for one process
    rundir.write_pointer(job_dir, rundir.run_directory(cfg, choices, cfg.trainer.devices))
    code = launch_local(cfg.trainer.devices, ["train", *overrides])
    if code == INTERRUPTED:
        raise KeyboardInterrupt
    if code and not multirun:
        raise SystemExit(code)


class ConsoleFormatter(logging.Formatter):
    """``ngexp: warning: message`` (the level in lower case, like ``ngexp: error:``)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"ngexp: {record.levelname.lower()}: {record.getMessage()}"


def configure_logging() -> None:
    """ngexp's warnings on stderr as ``ngexp: warning: ...``, its info records only in a run's
    ``train.log``; never through Hydra's ``[HYDRA]`` root handler."""
    log = logging.getLogger("ngexp")
    log.propagate = False
    if not any(getattr(h, "ngexp_console", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(ConsoleFormatter())
        handler.ngexp_console = True  # type: ignore[attr-defined]
        log.addHandler(handler)


def train_command(args: list[str]) -> int:
    if "--hydra-help" in args:
        print(hydra_help())
        return 0
    if "-h" in args or "--help" in args:
        print(train_help())
        return 0
    flags, overrides = split_args(args)
    if not any(flag.split("=")[0] in INSPECT_FLAGS for flag in flags):
        try:
            validate_overrides(overrides, ConfigSource.of(flags))
        except Exception as error:  # any composition or schema error -> one line
            return error_line(describe(error, overrides))
    if "-m" in flags or "--multirun" in flags:
        args = flags + defer_group_keys(overrides)
    return run_hydra(args)


#: Hydra's flags that print instead of running (the config is not validated for them).
INSPECT_FLAGS = ("--cfg", "-c", "--info", "-i")
#: Hydra's flags whose value may be the next argument.
VALUE_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
               "--cfg", "-c", "--package", "-p")


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """``(Hydra's flags with their values, the overrides)`` of ``ngexp train``'s arguments."""
    flags: list[str] = []
    overrides: list[str] = []
    rest = iter(args)
    for arg in rest:
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        flags.append(arg)
        if arg in VALUE_FLAGS:
            following = next(rest, None)
            if following is not None:
                flags.append(following)
    return flags, overrides


@dataclass(frozen=True)
class ConfigSource:
    """Where Hydra composes the run's config from: ngexp's ``conf/`` and ``train``, or what
    ``--config-path/-cp``, ``--config-name/-cn`` and ``--config-dir/-cd`` say (a saved
    config, a folder of one's own presets)."""

    path: Path
    name: str = "train"
    extra: Path | None = None

    @classmethod
    def of(cls, flags: list[str]) -> ConfigSource:
        def value(*names: str) -> str | None:
            for index, flag in enumerate(flags):
                key, equals, given = flag.partition("=")
                if key in names:
                    return given if equals else (flags[index + 1] if index + 1 < len(flags)
                                                 else None)
            return None

        path, extra = value("--config-path", "-cp"), value("--config-dir", "-cd")
        # Hydra reads a relative --config-path from the folder of the app's module
        root = Path(__file__).parent / path if path is not None else conf_dir()
        return cls(root.resolve(), value("--config-name", "-cn") or "train",
                   Path(extra).resolve() if extra else None)

    def search_path(self, overrides: list[str]) -> list[str]:
        """``overrides`` with ``--config-dir``'s folder on the search path (unless the user
        sets ``hydra.searchpath`` there)."""
        if self.extra is None or any(o.startswith("hydra.searchpath=") for o in overrides):
            return overrides
        return [*overrides, f"hydra.searchpath=[file://{self.extra}]"]


def main(argv: list[str] | None = None) -> int:
    """``ngexp`` entry point; a closed stdout (``ngexp train --help | head``) ends it quietly."""
    try:
        return dispatch(sys.argv[1:] if argv is None else argv)
    except UserError as error:  # e.g. a plugin that cannot be loaded (ngexp.plugins)
        return error_line(str(error))
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit flush
        return 1


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(top_help())
        return 0
    if argv[0] == "--version":
        from ngexp import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_command(rest)
    if command == "report":
        from ngexp.report import main as report_main

        return report_main(rest)
    return error_line(f"unknown command {command!r}; choices: {', '.join(COMMANDS)}")
