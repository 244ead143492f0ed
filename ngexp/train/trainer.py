"""The trainer: the training loop of a built run (:mod:`ngexp.train.build`) and the step.

One training step (callbacks in :mod:`ngexp.callbacks`, the optimizer in
:mod:`ngexp.optim.training`): step start -> forward/loss -> backward (a preconditioner records
its curvature) -> callbacks before the step -> global-norm clipping -> preconditioner and
optimizer step -> lr schedule -> callbacks after the step. Training metrics stay on the device
(:mod:`ngexp.train.metric_window`) and are read once per ``trainer.log_every`` steps, so the
step path does not synchronize with the host.

The parts the loop calls each have their module: evaluation (:mod:`~ngexp.train.evaluation`),
best-model tracking (:mod:`~ngexp.train.best`), checkpoints and the choice on resume
(:mod:`~ngexp.train.resume`), stop requests (:mod:`~ngexp.train.stop`) and the agreement of
data-parallel ranks on them (:mod:`~ngexp.train.ranks`). A session around the loop -- the
run's log, loggers, signals and summary (:mod:`~ngexp.train.summarize`) -- is
:mod:`ngexp.train.session`. The trainer is what
``trainer.*`` configures and what callbacks see (the :class:`ngexp.callbacks.Trainer` protocol).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ngexp.data.bundle import epoch_batches
from ngexp.train.best import BestMetrics, selection_key
from ngexp.train.build import Run
from ngexp.train.checkpoint import LAST, rng_state, set_rng_state
from ngexp.train.clock import TrainingClock
from ngexp.train.console import ConsoleProgress
from ngexp.train.evaluation import Evaluator
from ngexp.train.lr_schedule import step_scheduler
from ngexp.train.metric_window import MetricWindow
from ngexp.train.resume import Cadence, Checkpoints
from ngexp.train.runlog import say
from ngexp.train.stop import RunInterrupted, StopRequest

#: The checkpoint of the best evaluation of :meth:`Trainer.selection_key`.
BEST = "best.pt"


class Trainer:
    """Trains ``run`` from its current step to ``total_steps``; implements
    :class:`ngexp.callbacks.Trainer` for the callbacks."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.model, self.optimizer, self.task, self.data = run.model, run.optimizer, run.task, \
            run.data
        self.console, self.generator, self.callbacks = run.console, run.generator, run.callbacks
        self.total_steps, self.steps_per_epoch = run.total_steps, run.steps_per_epoch
        self.step = 0
        self.epoch = 0
        self.permutation: Tensor | None = None  # this epoch's order of the training examples
        self.clock = TrainingClock()
        self.best = BestMetrics()
        self.last_eval: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self.stop = StopRequest()
        self.window = MetricWindow(run.task, run.world, run.device, self.clock, self.step)
        self.evaluator = Evaluator(run)
        self.evaluate = self.evaluator.evaluate
        self.train_batches = self.evaluator.train_batches
        self.checkpoints = Checkpoints(run.run_dir, run.world, run.console)
        self.cadence = Cadence(run.settings)
        self.progress = ConsoleProgress(run.console, "none", run.total_steps, 0,
                                        run.steps_per_epoch)

    @property
    def elapsed(self) -> float:
        """Training wall time of this run in seconds, summed over resumes, without evaluations
        and checkpoint writes (:mod:`ngexp.train.clock`)."""
        return self.clock.seconds

    def start_session(self) -> None:
        """Start this session's training clock, checkpoint minutes and metric window at the
        current step (after :meth:`load_state_dict` on a resume; a window restored from the
        checkpoint continues)."""
        self.clock.start_session()
        self.cadence.reset()
        if self.window.steps == 0:
            self.window.reset(self.step)

    def selection_key(self) -> str:
        """The metric ``best.pt`` follows (:func:`ngexp.train.best.selection_key`)."""
        return selection_key(self.data, self.task)

    def request_stop(self, reason: str) -> None:
        """End training after the current step as completed, e.g. early stopping."""
        self.stop.reason = reason

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record ``metrics`` at ``step`` (default: the current step) with every logger
        (metrics.jsonl first)."""
        step = self.step if step is None else step
        for logger in self.run.loggers:
            logger.log(step, step / self.steps_per_epoch, self.elapsed, metrics)

    # ----------------------------------------------------------------- the loop
    def fit(self) -> None:
        """Train to ``total_steps``, or until a callback asks to stop (checkpointed, then
        done) or a stop signal arrives (checkpointed, then :class:`RunInterrupted`)."""
        run, settings = self.run, self.run.settings
        for callback in self.callbacks:
            callback.on_train_start(self)
        while self.step < self.total_steps and self.stop.reason is None:
            self.epoch = self.step // self.steps_per_epoch
            start = self.step % self.steps_per_epoch
            if start == 0 or self.permutation is None:
                self.permutation = torch.randperm(len(self.data.train), device=run.device,
                                                  generator=self.generator)
            due = False  # a checkpoint of the step or time cadence (resume.Cadence)
            for inputs, targets in epoch_batches(self.data.train, settings.batch_size,
                                                 self.permutation, start, self.data.augment,
                                                 self.generator, run.world.rank, run.world.size):
                self.train_step(inputs, targets)
                self.progress.advance(self.step)
                if self.step % settings.log_every == 0:
                    self._flush_window()
                if settings.eval_every and self.step % settings.eval_every == 0:
                    self._evaluate_and_log()
                if self.stop.signalled(run.world, self.cadence.time_due()):
                    self._check_finite()
                    self._save(LAST)
                    raise RunInterrupted()
                if self.stop.reason is not None:  # e.g. early stopping after an evaluation
                    self._flush_window()
                    self._save(LAST)
                    break
                if self.step >= self.total_steps:
                    break
                due = self.stop.checkpoint_due or self.cadence.step_due(self.step)
                if due and self.step % self.steps_per_epoch:  # else at the epoch's end
                    self._check_finite()
                    self._save(LAST)
            if self.stop.reason is None and (self.step % self.steps_per_epoch == 0
                                             or self.step >= self.total_steps):
                self._end_epoch(due)
        for callback in self.callbacks:
            callback.on_train_end(self)

    def train_step(self, inputs: Tensor, targets: Tensor) -> None:
        """One optimizer step on the batch ``inputs``, ``targets`` (see the module docstring)."""
        run, settings = self.run, self.run.settings
        for callback in self.callbacks:
            callback.on_step_start(self)
        inputs = run.memory_format(inputs)
        targets = run.task.targets(inputs, targets)
        self.optimizer.zero_grad()
        forward = run.eager if self.optimizer.captures_next_forward else run.forward
        with run.autocast():
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
        clip = settings.grad_clip
        logging_step = (self.step + 1) % settings.log_every == 0
        if clip is not None or logging_step:
            norm = torch.nn.utils.clip_grad_norm_(run.params, clip if clip else math.inf)
            if logging_step:
                self.window.grad_norm = norm.detach()
        self.optimizer.step()
        step_scheduler(run.scheduler, self.step == 0 and self.optimizer.grad_scaler is not None)
        for callback in self.callbacks:
            callback.after_optimizer_step(self)
        self.window.record(outputs, targets, loss)
        self.step += 1

    def _end_epoch(self, due: bool) -> None:
        """The epoch's record, callbacks and evaluation, then ``last.pt`` when a cadence
        (``due``: of steps or time) or the end of training asks for it."""
        settings = self.run.settings
        self._flush_window()
        for callback in self.callbacks:
            callback.on_epoch_end(self)
        finished = self.step >= self.total_steps
        if not settings.eval_every or finished and self.step % settings.eval_every:
            self._evaluate_and_log()
        epochs_done = math.ceil(self.step / self.steps_per_epoch)
        if finished or due or self.stop.reason is not None \
                or self.cadence.epoch_due(epochs_done):
            self._save(LAST)

    def _flush_window(self) -> None:
        """Log the window's training metrics (one host sync); stop at a non-finite loss."""
        self._check_finite()
        if self.window.steps == 0:
            return
        metrics = self.window.flush(self.optimizer, self.run.global_batch)
        self.last_train = metrics
        self.log(metrics)
        self.progress.update(self.step, metrics)
        self.window.reset(self.step)

    def _check_finite(self) -> None:
        """Stop the run (``FloatingPointError``) when a training loss of this window was not
        finite on any rank, after logging what led there
        (:meth:`MetricWindow.nonfinite_records`)."""
        records = self.window.nonfinite_records(self.step)
        for step, steps in records:
            metrics = self.window.averages(steps)
            self.log(metrics, step=step)
            self.progress.update(step, metrics)
        if records:
            raise FloatingPointError(f"nan at step {records[-1][0]}")

    def _evaluate_and_log(self) -> None:
        with self.clock.paused():
            metrics = self.evaluator.evaluate_splits()
            for callback in self.callbacks:
                metrics.update(callback.metrics(self))
            self.last_eval = metrics
            self.log(metrics)
            self.progress.update(self.step, metrics)
            if self.best.update(metrics, self.step, self.selection_key()):
                self._save(BEST)
            for callback in self.callbacks:
                callback.on_evaluation(self, metrics)

    # ----------------------------------------------------------------- state
    def _save(self, name: str) -> None:
        with self.clock.paused():
            self.checkpoints.save(name, self.state_dict())
        if name == LAST:
            self.cadence.reset()

    def state_dict(self) -> dict[str, Any]:
        run = self.run
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "rng": rng_state(self.generator),
            "step": self.step,
            "epoch": self.epoch,
            "permutation": self.permutation,
            "elapsed": self.elapsed,
            "best": self.best.values,
            "best_step": self.best.steps,
            "last_eval": self.last_eval,
            "last_train": self.last_train,
            "window": self.window.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for callback in self.callbacks:  # first: one may restore the model's structure
            callback.load_state_dict(state["callbacks"].get(callback.name, {}))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.run.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.generator)
        self.step, self.epoch = state["step"], state["epoch"]
        permutation = state["permutation"]
        self.permutation = None if permutation is None else permutation.to(self.run.device)
        self.clock.before = state["elapsed"]
        self.best.values, self.last_eval = state["best"], state["last_eval"]
        self.best.steps = state.get("best_step", {})
        self.last_train = state.get("last_train", {})
        if "window" in state:
            self.window.load_state_dict(state["window"])
        elif self.step % self.run.settings.log_every:
            say(self.console, f"checkpoint without its metric window (an earlier ngexp): the "
                              f"first train/ record after step {self.step} averages only the "
                              f"steps after it")
