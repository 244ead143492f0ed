"""One process's session of a run: from the run directory's lock to ``summary.json``.

:func:`train` decides whether to run at all (a finished run is skipped, a live one is left
alone), builds the run (:func:`ngexp.train.build.build_run`) and prepares its directory
(:mod:`ngexp.train.rundir`); :func:`run_session` then resumes from the newest good checkpoint
(or starts over, the earlier outputs set aside: :meth:`~ngexp.train.resume.Checkpoints.plan`),
opens ``train.log`` and the loggers, catches stop signals, runs the trainer's loop
(:meth:`ngexp.train.trainer.Trainer.fit`) and ends with the summary
(:mod:`ngexp.train.summarize`), whatever happened.

Data-parallel (a process of ``torchrun``, ``trainer.devices=N`` or a multi-task SLURM step;
``docs/distributed.md``): every rank builds the same run, trains through
``DistributedDataParallel`` on its rows of each global batch, evaluates its shard of each split
and sums its metric sums with the others' before anything is logged; rank 0 alone writes the
run directory (after deciding, for all, whether to skip, resume or start over). Host-side
decisions that may differ between ranks (a stop signal, a NaN, a failed write) are agreed on
with the other ranks (:mod:`ngexp.train.ranks`), so all of them checkpoint and stop at the
same step.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console

from ngexp.config import GROUPS, semantic_config
from ngexp.summary import Status
from ngexp.train import rundir
from ngexp.train.build import build_run, join_world, run_console
from ngexp.train.console import ConsoleProgress, summary_table
from ngexp.train.loggers import Logger, RunInfo, flat_hparams
from ngexp.train.ranks import on_main
from ngexp.train.rundir import RunWriteError, describe_os_error
from ngexp.train.runlog import attach_run_log, detach_run_log, log, say
from ngexp.train.stop import RunInterrupted
from ngexp.train.summarize import summarize, summary_rows
from ngexp.train.trainer import Trainer


def train(cfg: DictConfig, choices: Mapping[str, str | None], console: Console | None = None,
          job_dir: Path | None = None, *, run_dir: Path | None = None,
          hydra_files: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Run (or skip, or resume) the run of ``cfg``; returns its summary (``None`` if skipped).

    Bad input fails before anything is written (building the run validates data, model and
    optimizer together). Then the run directory's lock is taken before anything in it changes:
    a live run is never renamed (``force=true``, ``resume=false``) nor written to.
    Data-parallel, this joins the process group first; rank 0 decides and writes, for all.
    """
    world = join_world(cfg)
    console = run_console(world, console)
    if run_dir is None:
        run_dir = rundir.run_directory(cfg, choices, world.size)
        if run_dir.parent.name != rundir.config_hash(cfg, world.size):
            console.print(f"using {run_dir}: the run of this config written by an earlier "
                          f"ngexp version (its directory hash was computed another way)")
    if not cfg.force and on_main(world, lambda: rundir.skip_finished(run_dir, console, job_dir)):
        return None
    trainer = Trainer(build_run(cfg, choices, run_dir, console, world))
    with ExitStack() as stack:
        if not on_main(world, lambda: rundir.prepare_run_dir(stack, cfg, run_dir, console,
                                                             job_dir, hydra_files)):
            return None
        console.print(f"run dir: {run_dir}")
        return run_session(trainer)


def run_session(trainer: Trainer) -> dict[str, Any]:
    """Train to ``total_steps`` (resuming from the newest good checkpoint); a write error
    (disk full, permissions) ends the run as ``failed(io: ...)``."""
    run = trainer.run
    main = run.world.is_main
    plan = trainer.checkpoints.plan()  # before train.log: a run that starts over sets it aside
    run_log = attach_run_log(run.run_dir / "train.log") if main else None
    preconditioner = trainer.optimizer.preconditioner
    if preconditioner is not None:  # said when it was built, before train.log was open
        log.info("%s", preconditioner.coverage.describe(type(preconditioner).__name__))
    for note in plan.notes:
        say(run.console, note)
    resumed_step = trainer.checkpoints.resume(plan, trainer.load_state_dict)
    trainer.start_session()
    handlers: dict[int, Any] = {}
    started: list[Logger] = []
    trainer.progress = ConsoleProgress(run.console, run.settings.progress if main else "none",
                                       trainer.total_steps, trainer.step,
                                       trainer.steps_per_epoch)
    status: Status
    try:
        info = run_info(trainer, resumed_step)
        for logger in run.loggers:
            logger.start(info)
            started.append(logger)
        if main:
            rundir.write_summary(run.run_dir, summarize(trainer, "running").to_json())
        with trainer.stop.catching_signals() as handlers:
            trainer.fit()
        status, reason = "completed", trainer.stop.reason
    except FloatingPointError as error:
        status, reason = "failed", str(error)
    except RunInterrupted:
        status, reason = "interrupted", f"signal {signal.Signals(trainer.stop.signal).name}"
    except OSError as error:
        status, reason = "failed", f"io: {describe_os_error(error)}"
    except Exception as error:
        finish(trainer, "failed", f"{type(error).__name__}: {error}", started, run_log)
        raise
    finally:
        trainer.progress.close()
    summary = finish(trainer, status, reason, started, run_log)
    if status == "interrupted":
        trainer.stop.pass_on(handlers)  # e.g. submitit's requeue on USR2
        raise RunInterrupted(reason)
    if reason is not None and reason.startswith("io: "):
        raise RunWriteError(f"{run.run_dir}: {reason[4:]}; the last good checkpoint is "
                            f"kept: run the same command again once that is fixed")
    return summary


def finish(trainer: Trainer, status: Status, reason: str | None, started: list[Logger],
           run_log: logging.Handler | None) -> dict[str, Any]:
    """End the loggers' sessions, write the summary and show it -- as far as the disk lets."""
    run = trainer.run
    summary = summarize(trainer, status, reason)
    try:
        for logger in started:
            try:
                logger.finish(status, reason)
            except OSError:
                pass  # the summary below still says how the run ended
    finally:
        for logger in run.loggers:
            logger.close()
    try:
        if run.world.is_main:
            rundir.write_summary(run.run_dir, summary.to_json())
    except OSError as error:
        say(run.console, f"could not write {run.run_dir / 'summary.json'}: "
                         f"{describe_os_error(error)}")
    if trainer.progress.mode != "none":  # progress=none: silence (summary.json has it)
        run.console.print(summary_table(summary_rows(summary, trainer)))
    say(run.console, f"run dir: {run.run_dir}")
    if run_log is not None:
        detach_run_log(run_log)
    return summary.to_json()


def run_info(trainer: Trainer, resumed_step: int | None) -> RunInfo:
    """What the loggers know of this run (hyperparameters: every semantic config key and
    the seed; metrics: the loss and task metrics of each evaluated split)."""
    run = trainer.run
    hparams = {f"choice/{group}": str(option) for group, option in run.choices.items()}
    semantic = {key: value for key, value in semantic_config(run.cfg).items()
                if key in (*GROUPS, "trainer")}
    hparams.update({key: value for key, value in flat_hparams(semantic).items()
                    if not key.endswith("._target_")})
    hparams["seed"] = int(run.cfg.seed)
    splits = [split for split in ("val", "test") if getattr(run.data, split) is not None]
    metrics = ("train/loss", *(f"{split}/{name}" for split in splits
                               for name in ("loss", *run.task.metric_names)))
    family, config_hash, seed = run.run_dir.parts[-3:]
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return RunInfo(run.run_dir, family, f"{config_hash}/{seed}", f"{family}/{config_hash}",
                   Path(run.cfg.output_root), hparams, metrics, resumed_step,
                   rundir.run_label(overrides))
