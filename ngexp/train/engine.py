"""The training engine: one run from a composed config to a finished run directory.

Order of one training step (callbacks in :mod:`ngexp.callbacks`, the optimizer in
:mod:`ngexp.optim.training`): step start -> forward/loss -> backward (a preconditioner records
its curvature) -> callbacks before the step -> global-norm clipping -> preconditioner and
optimizer step -> lr schedule -> callbacks after the step. Training metrics are accumulated on
the device and read once per ``trainer.log_every`` steps, so the step path does not synchronize
with the host.

Data-parallel (a process of ``torchrun``, ``trainer.devices=N`` or a multi-task SLURM step;
``docs/distributed.md``): every rank builds the same run, trains through
``DistributedDataParallel`` on its rows of each global batch, evaluates its shard of each split
and sums its metric sums with the others' before anything is logged; rank 0 alone writes the
run directory (after deciding, for all, whether to skip, resume or start over). Host-side
decisions that may differ between ranks (a stop signal, a NaN, a failed write) are agreed on
with the other ranks, so all of them checkpoint and stop at the same step.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import resource
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ngexp.callbacks import Callback
from ngexp.config import TrainerConfig, check_world, semantic_config
from ngexp.curvature.tasks import Reconstruction, Task, build_task
from ngexp.data.bundle import DataBundle, epoch_batches, eval_batches
from ngexp.distributed import comm
from ngexp.distributed.world import World, join, launched_world
from ngexp.errors import UserError
from ngexp.metrics import better
from ngexp.models import build_model
from ngexp.optim.build import build_optimizer
from ngexp.train import rundir
from ngexp.train.checkpoint import (
    LAST,
    PREVIOUS,
    all_finite,
    init_weights,
    load_resumable,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ngexp.train.console import ConsoleProgress, format_duration, format_number, summary_table
from ngexp.train.loggers import Logger, MetricsFile, RunInfo, build_loggers, flat_hparams
from ngexp.train.precision import autocast, grad_scaler

#: Signals that stop a run with a checkpoint (USR2: SLURM's warning before preemption/time-out).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2")
                     if hasattr(signal, name))


log = logging.getLogger("ngexp")


class RunInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once the checkpoint and summary are written."""


class RunWriteError(UserError):
    """The run could not write its files (disk full, permissions); it ended ``failed(io)``."""


class RankZeroFailed(UserError):
    """Rank 0 stopped a data-parallel run before training (it reports why)."""


#: ``first_bad_step`` of a rank without a non-finite loss, when the ranks agree on the first.
NO_BAD_STEP = 2**62


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """The device of ``trainer.device``; data-parallel, ``cuda`` is ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name!r} but CUDA is not available; choices: auto, cpu")
    if world is not None and world.distributed and name == "cuda":
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def on_main(world: World, action: Callable[[], bool]) -> bool:
    """``action()`` run on rank 0 only (where it may print, write and raise), its outcome the
    same on every rank; an exception there stops the other ranks too
    (:class:`RankZeroFailed`)."""
    outcome, failure = False, None
    if world.is_main:
        try:
            outcome = action()
        except Exception as error:  # re-raised below, once the other ranks know
            failure = error
    code = comm.broadcast_int(-1 if failure is not None else int(outcome))
    if failure is not None:
        raise failure
    if code < 0:
        raise RankZeroFailed("rank 0 stopped the run (its error says why)")
    return bool(code)


def environment() -> dict[str, Any]:
    """Device, library versions and the git commit of the ngexp source, for ``summary.json``."""
    import hydra

    from ngexp import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": {"ngexp": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "hydra": hydra.__version__},
        "git_commit": commit,
        "host": platform.node(),
    }


class Engine:
    """Builds data, model, optimizer and callbacks from ``cfg`` and trains in ``run_dir``."""

    def __init__(self, cfg: DictConfig, choices: Mapping[str, str | None], run_dir: Path,
                 console: Console | None = None) -> None:
        self.cfg, self.choices, self.run_dir = cfg, dict(choices), run_dir
        self.console = console or Console(soft_wrap=True)
        # A plain dataclass, read once: DictConfig attribute access costs ~20 us per read, which
        # the per-step path would pay several times per step.
        self.trainer = trainer = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
        launched = launched_world()
        check_world(cfg, launched, launched.distributed)
        self.world = join(trainer.device)
        if not self.world.is_main:  # rank 0 speaks and writes for the run
            self.console = Console(quiet=True)
        self.device = resolve_device(trainer.device, self.world)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        # set either way: an earlier run in this process (a sweep) must not leak its choice
        torch.use_deterministic_algorithms(trainer.deterministic)
        if trainer.deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS's deterministic mode
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)

        bundle: DataBundle = instantiate(cfg.data, _partial_=True)()
        self.data = bundle.to(self.device)
        model = build_model(cfg.model, self.data.spec)
        if trainer.sync_bn and self.world.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if trainer.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.task: Task = build_task(getattr(self.model, "task", self.data.spec.task))
        if cfg.init_from:
            load_init_weights(self.model, cfg.init_from)
        self.callbacks: list[Callback] = [instantiate(node, _partial_=True)()
                                          for node in (cfg.get("callbacks") or {}).values()]
        if cfg.get("prune"):
            self.callbacks.append(instantiate(cfg.prune, _partial_=True)())
        for callback in self.callbacks:  # e.g. variational gates: parameters to train
            callback.on_model_built(self)
        self.optimizer = build_optimizer(cfg.optimizer, self.model, self.task,
                                         grad_scaler(trainer.precision, self.device))
        # Compiled forward passes; the steps whose forward a preconditioner captures (its
        # statistics, its batch) run the eager model, whose hooks then record.
        self.forward = torch.compile(self.model) if trainer.compile else self.model
        #: The training forward of the steps a preconditioner captures (eager).
        self.eager = self.model
        if self.world.distributed:  # training through DDP; evaluation on the model itself
            self.local_forward = self.forward
            self.eager = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.forward = torch.compile(self.eager) if trainer.compile else self.eager

        self.global_batch = trainer.batch_size * self.world.size
        self.steps_per_epoch = len(self.data.train) // self.global_batch
        if self.steps_per_epoch == 0:
            processes = f" x {self.world.size} processes" if self.world.distributed else ""
            raise UserError(f"trainer.batch_size={trainer.batch_size}{processes} is larger than "
                            f"the {len(self.data.train)} training examples; choose at most "
                            f"{len(self.data.train) // self.world.size}")
        # trainer.epochs or trainer.max_steps, whichever comes first
        self.total_steps = min(trainer.max_steps or math.inf, trainer.epochs * self.steps_per_epoch)
        multiplier = instantiate(cfg.lr_schedule, _partial_=True)(
            total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.optimizer, multiplier)
        self.loggers: list[Logger] = ([MetricsFile(), *build_loggers(cfg.get("logger") or {})]
                                      if self.world.is_main else [])
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.step = 0
        self.epoch = 0
        self.permutation: Tensor | None = None
        self.elapsed_before = 0.0
        self.best: dict[str, float] = {}
        self.best_step: dict[str, int] = {}
        self.last_eval: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self.stop_signal: int | None = None
        self.stop_reason: str | None = None
        self._reset_window()

    # ----------------------------------------------------------------- public helpers
    @property
    def elapsed(self) -> float:
        """Training wall time of this run in seconds, summed over resumes."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.trainer.precision, self.device)

    def targets_for(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return inputs.flatten(1) if isinstance(self.task, Reconstruction) else targets

    def train_batches(self, num_examples: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The first ``num_examples`` training examples in order, unaugmented (for curvature)."""
        split = self.data.train
        for begin in range(0, min(num_examples, len(split)), batch_size):
            end = min(begin + batch_size, num_examples, len(split))
            inputs = split.inputs[begin:end]
            yield inputs, self.targets_for(inputs, split.targets[begin:end])

    @torch.no_grad()
    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Loss and metrics averaged over a whole split (``test``, ``val`` or ``train``)."""
        data = getattr(self.data, split)
        forward = self.forward
        if self.world.distributed:  # this rank's shard, the model itself
            data, forward = data.shard(self.world.rank, self.world.size), self.local_forward
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, Tensor] = {}
        count = 0
        for inputs, targets in eval_batches(data, self.trainer.eval_batch_size):
            inputs = self._to_memory_format(inputs)
            targets = self.targets_for(inputs, targets)
            with self.autocast():
                outputs = forward(inputs)
            for key, value in self.task.metric_sums(outputs, targets).items():
                sums[key] = sums[key] + value if key in sums else value
            count += self.task.num_terms(targets)
        self.model.train(was_training)
        totals = torch.stack(list(sums.values()))
        if self.world.distributed:  # every shard's sums
            totals, count = self._sum_over_ranks(totals, count)
        values = dict(zip(sums, totals.tolist(), strict=True))
        return self.task.finalize(values, count)

    def _sum_over_ranks(self, sums: Tensor, count: int) -> tuple[Tensor, int]:
        """``sums (k,)`` and ``count`` summed over the ranks (float64: exact counts)."""
        total, terms = comm.all_reduce_sum(
            [sums.double(), torch.tensor(float(count), dtype=torch.float64, device=sums.device)])
        return total, int(terms)

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record ``metrics`` at ``step`` (default: the current step) with every logger
        (metrics.jsonl first)."""
        step = self.step if step is None else step
        for logger in self.loggers:
            logger.log(step, step / self.steps_per_epoch, self.elapsed, metrics)

    def request_stop(self, reason: str) -> None:
        """End training after the current step as completed, e.g. early stopping."""
        self.stop_reason = reason

    def say(self, message: str) -> None:
        """A line for the console and the run's ``train.log``."""
        self.console.print(message, highlight=False)
        log.info(message)

    def run_info(self, resumed_step: int | None) -> RunInfo:
        """What the loggers know of this run (hyperparameters: every semantic config key and
        the seed; metrics: the loss and task metrics of each evaluated split)."""
        hparams = {f"choice/{group}": str(option) for group, option in self.choices.items()}
        semantic = {key: value for key, value in semantic_config(self.cfg).items()
                    if key in ("data", "model", "optimizer", "lr_schedule", "prune", "trainer",
                               "logger", "callbacks")}
        hparams.update({key: value for key, value in flat_hparams(semantic).items()
                        if not key.endswith("._target_")})
        hparams["seed"] = int(self.cfg.seed)
        splits = [split for split in ("val", "test") if getattr(self.data, split) is not None]
        metrics = ("train/loss", *(f"{split}/{name}" for split in splits
                                   for name in ("loss", *self.task.metric_names)))
        family, config_hash, seed = self.run_dir.parts[-3:]
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        return RunInfo(self.run_dir, family, f"{config_hash}/{seed}", f"{family}/{config_hash}",
                       Path(self.cfg.output_root), hparams, metrics, resumed_step,
                       rundir.run_label(overrides))

    # ----------------------------------------------------------------- training step
    def _to_memory_format(self, inputs: Tensor) -> Tensor:
        if self.trainer.channels_last and inputs.ndim == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def _reset_window(self) -> None:
        #: per step of the window: the task's metric sums (k,) and the number of terms
        self.window_rows: list[Tensor] = []
        self.window_terms: list[int] = []
        self.window_keys: tuple[str, ...] = ()
        self.window_grad_norm: Tensor | None = None
        self.window_steps = 0
        self.window_start = time.perf_counter()
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.step_counter = torch.full((), self.step, dtype=torch.int64, device=self.device)

    def train_step(self, inputs: Tensor, targets: Tensor) -> None:
        for callback in self.callbacks:
            callback.on_step_start(self)
        inputs = self._to_memory_format(inputs)
        targets = self.targets_for(inputs, targets)
        self.optimizer.zero_grad()
        forward = self.eager if self.optimizer.captures_next_forward else self.forward
        with self.autocast():
            outputs = forward(inputs)
            loss = self.task.loss(outputs, targets)
        objective = loss
        for callback in self.callbacks:
            term = callback.loss_term(self)
            if term is not None:  # e.g. a KL term of variational pruning
                objective = objective + term
        self.optimizer.backward(objective, outputs, targets)
        for callback in self.callbacks:
            callback.before_optimizer_step(self)
        clip = self.trainer.grad_clip
        logging_step = (self.step + 1) % self.trainer.log_every == 0
        if clip is not None or logging_step:
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip else math.inf)
            if logging_step:
                self.window_grad_norm = norm.detach()
        self.optimizer.step()
        self._step_schedule()
        for callback in self.callbacks:
            callback.after_optimizer_step(self)

        with torch.no_grad():
            sums = self.task.metric_sums(outputs.detach(), targets, loss)
            self.window_keys = tuple(sums)
            self.window_rows.append(torch.stack([value.float() for value in sums.values()]))
            self.step_counter += 1
            bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
            self.first_bad_step = torch.where(bad, self.step_counter, self.first_bad_step)
        self.window_terms.append(self.task.num_terms(targets))
        self.window_steps += 1
        self.step += 1

    def _step_schedule(self) -> None:
        """Advance the lr schedule: one step per training step, also a step that the grad
        scaler skipped (torch's warning that a run's first step came before any optimizer
        step is expected then and not shown)."""
        if self.step > 0 or self.optimizer.grad_scaler is None:
            self.scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before",
                                    UserWarning)
            self.scheduler.step()

    def _check_finite(self) -> None:
        """Stop the run (``FloatingPointError``) when a training loss of this window was not
        finite, after logging what led there: the window's finite steps as one record at the
        step before, and the first non-finite step's own metrics at that step."""
        bad = int(self.first_bad_step)
        if self.world.distributed:  # the first on any rank: every rank stops
            bad = comm.agree_min(bad if bad >= 0 else NO_BAD_STEP)
            bad = -1 if bad == NO_BAD_STEP else bad
        if bad < 0:
            return
        finite = bad - (self.step - self.window_steps) - 1  # steps of the window before it
        records = [(bad - 1, slice(0, finite))] if finite > 0 else []
        for step, steps in [*records, (bad, slice(finite, finite + 1))]:
            metrics = self._train_metrics(steps)
            self.log(metrics, step=step)
            self.progress.update(step, metrics)
        raise FloatingPointError(f"nan at step {bad}")

    def _train_metrics(self, steps: slice) -> dict[str, float]:
        """The ``train/`` averages over the window's ``steps`` (one host sync; data-parallel,
        over every rank's examples)."""
        sums, terms = torch.stack(self.window_rows[steps]).sum(0), sum(self.window_terms[steps])
        if self.world.distributed:
            sums, terms = self._sum_over_ranks(sums, terms)
        averages = self.task.finalize(dict(zip(self.window_keys, sums.tolist(), strict=True)),
                                      terms)
        return {f"train/{k}": v for k, v in averages.items()}

    def _flush_window(self) -> None:
        """Read the accumulated training metrics (one host sync) and log them."""
        self._check_finite()
        if self.window_steps == 0:
            return
        seconds = time.perf_counter() - self.window_start
        metrics = self._train_metrics(slice(0, self.window_steps))
        metrics["optim/lr"] = self.optimizer.param_groups[0]["lr"]
        if self.window_grad_norm is not None:  # of the ranks' mean gradient: the same on all
            metrics["optim/grad_norm"] = float(self.window_grad_norm)
        metrics.update({f"optim/{k}": v for k, v in self.optimizer.log_metrics().items()})
        metrics["train/examples_per_s"] = self.window_steps * self.global_batch / seconds
        metrics["train/step_time_ms"] = 1000 * seconds / self.window_steps
        metrics["train/peak_mem_mb"] = self._peak_memory_mb()
        self.last_train = metrics
        self.log(metrics)
        self.progress.update(self.step, metrics)
        self._reset_window()

    def _peak_memory_mb(self) -> float:
        """The peak memory of this logging window, then reset: CUDA's allocated peak, or on
        the CPU the process's resident peak (Linux lets ``/proc/self/clear_refs`` reset it;
        elsewhere it is the peak since the process started)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak
        return resident_peak_mb()

    def _eval_and_log(self) -> None:
        self._estimate_population_statistics()
        metrics: dict[str, float] = {}
        for split in ("val", "test"):
            if getattr(self.data, split) is not None:
                metrics.update({f"{split}/{k}": v for k, v in self.evaluate(split).items()})
        for callback in self.callbacks:
            metrics.update(callback.metrics(self))
        self.last_eval = metrics
        self.log(metrics)
        self.progress.update(self.step, metrics)
        key = self.selection_key()
        improved = key in metrics and better(key, metrics[key], self.best.get(key))
        for name, value in metrics.items():
            if name.startswith(("test/", "val/")) and better(name, value, self.best.get(name)):
                self.best[name], self.best_step[name] = value, self.step
        if improved:
            self._save("best.pt")
        for callback in self.callbacks:
            callback.on_evaluation(self, metrics)

    def _estimate_population_statistics(self) -> None:
        """For a model that estimates its batch norms' population statistics from training
        batches before it is evaluated (the BN-LSTM's ``population_stats=training_set``): the
        training split in order, unaugmented, at the training batch size (the model stops
        reading when it has seen enough)."""
        estimate = getattr(self.model, "estimate_population_statistics", None)
        if estimate is None:
            return
        with torch.no_grad():
            estimate(inputs for inputs, _ in self.train_batches(len(self.data.train),
                                                                 self.global_batch))

    def selection_key(self) -> str:
        """The metric ``best.pt`` (and by default early stopping) follows: ``val/acc``, or
        ``test/acc`` without a validation split; the loss for tasks without accuracy."""
        split = "val" if self.data.val is not None else "test"
        metric = "acc" if "acc" in self.task.metric_names else "loss"
        return f"{split}/{metric}"

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "rng": rng_state(self.generator),
            "step": self.step,
            "epoch": self.epoch,
            "permutation": self.permutation,
            "elapsed": self.elapsed,
            "best": self.best,
            "best_step": self.best_step,
            "last_eval": self.last_eval,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for callback in self.callbacks:  # first: one may restore the model's structure
            callback.load_state_dict(state["callbacks"].get(callback.name, {}))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.generator)
        self.step, self.epoch = state["step"], state["epoch"]
        permutation = state["permutation"]
        self.permutation = None if permutation is None else permutation.to(self.device)
        self.elapsed_before = state["elapsed"]
        self.best, self.last_eval = state["best"], state["last_eval"]
        self.best_step = state.get("best_step", {})

    def _save(self, name: str) -> None:
        """Write a checkpoint, never one whose weights or optimizer state are not finite.
        Data-parallel, every rank builds the state (a preconditioner gathers its terms) and
        rank 0 writes it; a write error there stops every rank."""
        state = self.state_dict()
        if not all_finite([state["model"], state["optimizer"]]):
            raise FloatingPointError(f"nan at step {self.step} (non-finite weights or optimizer "
                                     f"state; no checkpoint written)")
        failure: OSError | None = None
        if self.world.is_main:
            try:
                save_checkpoint(self.run_dir / "checkpoints" / name, state)
            except OSError as error:
                failure = error
        if comm.agree_max(int(failure is not None)):
            raise failure or OSError(f"rank 0 could not write checkpoints/{name}")

    # ----------------------------------------------------------------- the run
    def _summary(self, status: str, reason: str | None = None) -> dict[str, Any]:
        return {
            "status": status,
            "reason": reason,
            "choices": self.choices,
            "seed": self.cfg.seed,
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "total_steps": self.total_steps,
            "wall_time": self.elapsed,
            "final": {**self.last_train, **self.last_eval},
            "best": self.best,
            "best_step": self.best_step,
            "world_size": self.world.size,
            "global_batch_size": self.global_batch,
            "device": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                       else f"cpu ({platform.processor() or platform.machine()}, "
                            f"{torch.get_num_threads()} threads)"),
            **environment(),
            "run_dir": str(self.run_dir.resolve()),
        }

    def _handle_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum

    def _resume(self) -> None:
        """Restore the newest verified checkpoint; a corrupted ``last.pt`` is set aside (kept for
        inspection) and the previous one used, or the run starts over -- with one line why.
        Data-parallel, rank 0 chooses (and sets aside) and every rank loads its choice."""
        folder = self.run_dir / "checkpoints"
        names = (LAST, PREVIOUS)
        resumable = None

        def choose() -> int:
            nonlocal resumable
            resumable = load_resumable(folder)
            for problem in resumable.skipped:
                name = problem.split(":", 1)[0]
                aside = rundir.set_aside(folder / name, "corrupt")
                self.say(f"checkpoint {problem}; moved to {aside.name}")
            if resumable.path is not None:
                return names.index(resumable.path.name) + 1
            return -1 if resumable.skipped else 0

        choice = comm.broadcast_int(choose() if self.world.is_main else 0)
        if choice > 0:
            state = resumable.state if resumable is not None \
                else read_checkpoint(folder / names[choice - 1])
            self.load_state_dict(state)
            if self.world.is_main:
                rundir.truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            source = "" if names[choice - 1] == LAST else f" ({names[choice - 1]})"
            self.say(f"resuming from step {self.step}{source}")
        elif choice < 0:
            if self.world.is_main:
                rundir.remove_outputs(self.run_dir)
            self.say("no usable checkpoint left: starting over")

    def run(self) -> dict[str, Any]:
        """Train to ``total_steps`` (resuming from the newest good checkpoint); a write error
        (disk full, permissions) ends the run as ``failed(io: ...)``."""
        main = self.world.is_main
        run_log = attach_run_log(self.run_dir / "train.log") if main else None
        preconditioner = self.optimizer.preconditioner
        if preconditioner is not None:  # said when it was built, before train.log was open
            log.info("%s", preconditioner.coverage.describe(type(preconditioner).__name__))
        resumed = bool(comm.broadcast_int(int(any((self.run_dir / "checkpoints").glob("*.pt")))))
        if resumed:
            self._resume()
        self.session_start = time.perf_counter()
        handlers: dict[int, Any] = {}
        started: list[Logger] = []
        self.progress = ConsoleProgress(self.console, self.trainer.progress if main else "none",
                                        self.total_steps, self.step, self.steps_per_epoch)
        try:
            info = self.run_info(self.step if resumed else None)
            for logger in self.loggers:
                logger.start(info)
                started.append(logger)
            if main:
                rundir.write_summary(self.run_dir, self._summary("running"))
            handlers = {sig: signal.signal(sig, self._handle_signal) for sig in STOP_SIGNALS}
            self._loop()
            status, reason = "completed", self.stop_reason
        except FloatingPointError as error:
            status, reason = "failed", str(error)
        except RunInterrupted:
            status, reason = "interrupted", f"signal {signal.Signals(self.stop_signal).name}"
        except OSError as error:
            status, reason = "failed", f"io: {describe_os_error(error)}"
        except Exception as error:
            status, reason = "failed", f"{type(error).__name__}: {error}"
            self._finish(status, reason, started, run_log)
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.progress.close()
        summary = self._finish(status, reason, started, run_log)
        if status == "interrupted":
            previous = handlers.get(self.stop_signal)  # e.g. submitit's requeue on USR2
            if callable(previous) and previous is not signal.default_int_handler:
                previous(self.stop_signal, None)
            raise RunInterrupted(reason)
        if reason is not None and reason.startswith("io: "):
            raise RunWriteError(f"{self.run_dir}: {reason[4:]}; the last good checkpoint is "
                                f"kept: run the same command again once that is fixed")
        return summary

    def _finish(self, status: str, reason: str | None, started: list[Logger],
                run_log: logging.Handler | None) -> dict[str, Any]:
        """End the loggers' sessions, write the summary and show it -- as far as the disk
        lets."""
        summary = self._summary(status, reason)
        try:
            for logger in started:
                try:
                    logger.finish(status, reason)
                except OSError:
                    pass  # the summary below still says how the run ended
        finally:
            for logger in self.loggers:
                logger.close()
        try:
            if self.world.is_main:
                rundir.write_summary(self.run_dir, summary)
        except OSError as error:
            self.say(f"could not write {self.run_dir / 'summary.json'}: "
                     f"{describe_os_error(error)}")
        if self.progress.mode != "none":  # progress=none: silence (summary.json has it)
            self.console.print(summary_table(self._summary_rows(status, reason)))
        self.say(f"run dir: {self.run_dir}")
        if run_log is not None:
            detach_run_log(run_log)
        return summary

    def _summary_rows(self, status: str, reason: str | None) -> dict[str, Any]:
        rows: dict[str, Any] = {
            "status": f"{status}({reason})" if reason else status,
            "step": f"{self.step:,} / {self.total_steps:,}",
            "epoch": f"{self.step / self.steps_per_epoch:.2f}",
            "wall time": format_duration(self.elapsed),
        }
        if "train/loss" in self.last_train:
            rows["train/loss"] = self.last_train["train/loss"]
        rows.update(self.last_eval)
        key = self.selection_key()
        if key in self.best:
            rows[f"best {key}"] = (f"{format_number(self.best[key], key)} "
                                   f"(step {self.best_step.get(key, '?')})")
        return rows

    def _loop(self) -> None:
        trainer = self.trainer
        for callback in self.callbacks:
            callback.on_train_start(self)
        while self.step < self.total_steps and self.stop_reason is None:
            self.epoch = self.step // self.steps_per_epoch
            start = self.step % self.steps_per_epoch
            if start == 0 or self.permutation is None:
                self.permutation = torch.randperm(len(self.data.train), device=self.device,
                                                  generator=self.generator)
            for inputs, targets in epoch_batches(self.data.train, trainer.batch_size,
                                                 self.permutation, start, self.data.augment,
                                                 self.generator, self.world.rank,
                                                 self.world.size):
                self.train_step(inputs, targets)
                self.progress.advance(self.step)
                if self.step % trainer.log_every == 0:
                    self._flush_window()
                if trainer.eval_every and self.step % trainer.eval_every == 0:
                    self._eval_and_log()
                    self.window_start = time.perf_counter()
                if self._stop_requested():
                    self._check_finite()
                    self._save("last.pt")
                    raise RunInterrupted()
                if self.stop_reason is not None:  # e.g. early stopping after an evaluation
                    self._flush_window()
                    self._save("last.pt")
                    break
                if self.step >= self.total_steps:
                    break
            if self.stop_reason is None and (self.step % self.steps_per_epoch == 0
                                             or self.step >= self.total_steps):
                self._end_epoch()
        for callback in self.callbacks:
            callback.on_train_end(self)

    def _stop_requested(self) -> bool:
        """Whether a stop signal arrived; data-parallel, on any rank (agreed on the host at
        every step, so every rank checkpoints the same step)."""
        if self.world.distributed:
            self.stop_signal = comm.agree_max(self.stop_signal or 0) or None
        return self.stop_signal is not None

    def _end_epoch(self) -> None:
        trainer = self.trainer
        self._flush_window()
        for callback in self.callbacks:
            callback.on_epoch_end(self)
        finished = self.step >= self.total_steps
        if not trainer.eval_every or finished and self.step % trainer.eval_every:
            self._eval_and_log()
        epochs_done = math.ceil(self.step / self.steps_per_epoch)
        if finished or self.stop_reason is not None or epochs_done % trainer.checkpoint_every == 0:
            self._save("last.pt")
        self.window_start = time.perf_counter()  # evaluation is not training time


def resident_peak_mb() -> float:
    """The process's peak resident memory in MB since the last call (Linux: ``VmHWM``, reset
    through ``/proc/self/clear_refs``), else the peak since the process started."""
    status = Path("/proc/self/status")
    try:
        peak = next(int(line.split()[1]) for line in status.read_text().splitlines()
                    if line.startswith("VmHWM:"))
        Path("/proc/self/clear_refs").write_text("5")
        return peak / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attach_run_log(path: Path) -> logging.Handler:
    """Copy the ``ngexp`` log (and the engine's lines, :meth:`Engine.say`) to ``path``."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler


def detach_run_log(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()


def train(cfg: DictConfig, choices: Mapping[str, str | None], console: Console | None = None,
          job_dir: Path | None = None, *, run_dir: Path | None = None,
          hydra_files: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Run (or skip, or resume) the run of ``cfg``; returns its summary (``None`` if skipped).

    Bad input fails before anything is written (building the :class:`Engine` validates data,
    model and optimizer together). Then the run directory's lock is taken before anything in it
    changes: a live run is never renamed (``force=true``, ``resume=false``) nor written to.
    Data-parallel, this joins the process group first; rank 0 decides and writes, for all.
    """
    console = console or Console(soft_wrap=True)
    launched = launched_world()
    check_world(cfg, launched, launched.distributed)
    world = join(cfg.trainer.device)
    if not world.is_main:
        console = Console(quiet=True)
    if run_dir is None:
        run_dir = rundir.run_directory(cfg, choices, world.size)
        if run_dir.parent.name != rundir.config_hash(cfg, world.size):
            console.print(f"using {run_dir}: the run of this config written by an earlier "
                          f"ngexp version (its directory hash was computed another way)")
    if not cfg.force and on_main(world, lambda: skip_finished(run_dir, console)):
        return None
    engine = Engine(cfg, choices, run_dir, console)
    with ExitStack() as stack:
        if not on_main(world, lambda: prepare_run_dir(stack, cfg, run_dir, console, job_dir,
                                                      hydra_files)):
            return None
        console.print(f"run dir: {run_dir}")
        return engine.run()


def prepare_run_dir(stack: ExitStack, cfg: DictConfig, run_dir: Path, console: Console,
                    job_dir: Path | None, hydra_files: Mapping[str, str] | None) -> bool:
    """Lock ``run_dir`` (held by ``stack``), set a replaced run aside and write the config;
    ``False`` when the run is to be skipped (finished, or another process holds it)."""
    lock = rundir.lock(make_run_dir(run_dir, cfg.output_root))
    if lock is None:
        console.print(f"skipping {run_dir}: another process is running this config")
        return False
    stack.enter_context(lock)
    if not cfg.force and skip_finished(run_dir, console):
        return False
    if (cfg.force or not cfg.resume) and rundir.has_outputs(run_dir):
        aside = rundir.set_aside(run_dir, "replaced")  # we hold its lock: nobody runs it
        console.print(f"{'force=true' if cfg.force else 'resume=false'}: previous run moved "
                      f"to {aside}")
        lock = rundir.lock(make_run_dir(run_dir, cfg.output_root))
        if lock is None:
            console.print(f"skipping {run_dir}: another process started this config")
            return False
        stack.enter_context(lock)
    try:
        if job_dir is not None:
            rundir.atomic_write_text(job_dir / "run_dir.txt", str(run_dir.resolve()) + "\n")
        if not any((run_dir / "checkpoints").glob("*.pt")):
            rundir.remove_outputs(run_dir)  # a run that died before its first checkpoint
        rundir.save_config(run_dir, cfg)
        for name, text in (hydra_files or {}).items():  # Hydra's own record of the job
            rundir.atomic_write_text(run_dir / ".hydra" / name, text)
    except OSError as error:
        raise RunWriteError(f"{run_dir}: {describe_os_error(error)}") from None
    return True


def skip_finished(run_dir: Path, console: Console) -> bool:
    """Whether the run in ``run_dir`` already finished (said on the console)."""
    summary = rundir.read_summary(run_dir)
    if not rundir.is_finished(summary):
        return False
    assert summary is not None
    reason = f"({summary['reason']})" if summary.get("reason") else ""
    console.print(f"skipping {run_dir}: already {summary['status']}{reason} "
                  f"(force=true re-runs it)")
    return True


def make_run_dir(run_dir: Path, output_root: str) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"output_root={output_root!r}: cannot create {run_dir} "
                        f"({describe_os_error(error)}); choose a writable folder") from None
    return run_dir


def describe_os_error(error: OSError) -> str:
    """``No space left on device (checkpoints/.last.pt.tmp)``: the reason and the file."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason} ({error.filename})" if error.filename else reason


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
