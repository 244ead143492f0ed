"""The training metrics of one logging window (the steps since the last ``train/`` record),
kept on the device so that the step path does not synchronize with the host.

Per step the window keeps the task's metric sums ``(k,)`` and its number of terms, and, on the
device, the first step whose loss was not finite. :meth:`MetricWindow.flush` reads it all once
(one host sync; data-parallel, summed over every rank's examples) every ``trainer.log_every``
steps.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch import Tensor

from ngexp.curvature.tasks import Task
from ngexp.distributed.world import World
from ngexp.optim.training import TrainingOptimizer
from ngexp.train.clock import TrainingClock
from ngexp.train.ranks import agree_first_bad_step, sum_over_ranks


class MetricWindow:
    """The ``train/`` metrics of the steps since the last record, and their timing."""

    def __init__(self, task: Task, world: World, device: torch.device, clock: TrainingClock,
                 step: int) -> None:
        self.task, self.world, self.device, self.clock = task, world, device, clock
        self.reset(step)

    def reset(self, step: int) -> None:
        """An empty window starting after ``step``."""
        self.rows: list[Tensor] = []  # per step: the task's metric sums (k,)
        self.terms: list[int] = []  # per step: the number of terms the sums add up
        self.keys: tuple[str, ...] = ()
        #: The global gradient norm of the window's last step (of the ranks' mean gradient).
        self.grad_norm: Tensor | None = None
        self.steps = 0
        self.started = self.clock.seconds  # training time: evaluations are left out
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.step_counter = torch.full((), step, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def record(self, outputs: Tensor, targets: Tensor, loss: Tensor) -> None:
        """Add one training step (no host sync)."""
        sums = self.task.metric_sums(outputs.detach(), targets, loss)
        self.keys = tuple(sums)
        self.rows.append(torch.stack([value.float() for value in sums.values()]))
        self.step_counter += 1
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, self.step_counter, self.first_bad_step)
        self.terms.append(self.task.num_terms(targets))
        self.steps += 1

    def averages(self, steps: slice) -> dict[str, float]:
        """The ``train/`` averages over the window's ``steps`` (one host sync; data-parallel,
        over every rank's examples)."""
        sums, terms = torch.stack(self.rows[steps]).sum(0), sum(self.terms[steps])
        if self.world.distributed:
            sums, terms = sum_over_ranks(sums, terms)
        averages = self.task.finalize(dict(zip(self.keys, sums.tolist(), strict=True)), terms)
        return {f"train/{k}": v for k, v in averages.items()}

    def nonfinite_records(self, step: int) -> list[tuple[int, slice]]:
        """Where the window's first non-finite loss is, on any rank: ``[]`` if none, else the
        records to log before stopping -- the finite steps before it as one record at the step
        before, and that step's own metrics (``(record step, window steps)`` each). ``step``:
        the step the window ends at."""
        bad = agree_first_bad_step(int(self.first_bad_step), self.world)
        if bad < 0:
            return []
        finite = bad - (step - self.steps) - 1  # steps of the window before it
        records = [(bad - 1, slice(0, finite))] if finite > 0 else []
        return [*records, (bad, slice(finite, finite + 1))]

    def flush(self, optimizer: TrainingOptimizer, global_batch: int) -> dict[str, float]:
        """The window's record: ``train/`` averages, the optimizer's state, throughput and
        peak memory."""
        seconds = self.clock.seconds - self.started
        metrics = self.averages(slice(0, self.steps))
        metrics["optim/lr"] = optimizer.param_groups[0]["lr"]
        if self.grad_norm is not None:  # of the ranks' mean gradient: the same on all
            metrics["optim/grad_norm"] = float(self.grad_norm)
        metrics.update({f"optim/{k}": v for k, v in optimizer.log_metrics().items()})
        metrics["train/examples_per_s"] = self.steps * global_batch / seconds
        metrics["train/step_time_ms"] = 1000 * seconds / self.steps
        metrics["train/peak_mem_mb"] = peak_memory_mb(self.device)
        return metrics


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory since the last call, then reset: CUDA's allocated peak, or on the CPU
    the process's resident peak (:func:`resident_peak_mb`)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resident_peak_mb()


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
