"""The training metrics of one logging window (the steps since the last ``train/`` record),
kept on the device so that the step path does not synchronize with the host.

Per step the window keeps the task's metric sums ``(k,)`` and its number of terms, and, on the
device, the first step whose loss was not finite. :meth:`MetricWindow.flush` reads it all once
(one host sync; data-parallel, summed over every rank's examples) every ``trainer.log_every``
steps. The window travels in checkpoints (:meth:`MetricWindow.state_dict`), so a run stopped
between two records and resumed records what the uninterrupted run does.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ngexp.curvature.tasks import Task
from ngexp.distributed import comm
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

    def state_dict(self) -> dict[str, Any]:
        """The window so far (tensors and plain containers), for a checkpoint: a resumed run's
        next record then averages the steps the uninterrupted run's does. Data-parallel (every
        rank calls this) it holds the sums over the ranks, which rank 0 takes on a resume."""
        rows, terms = list(self.rows), list(self.terms)
        if self.world.distributed and rows:
            total, counts = comm.all_reduce_sum([
                torch.stack(rows).double(),
                torch.tensor(terms, dtype=torch.float64, device=self.device)])
            rows, terms = list(total.float().unbind()), [int(t) for t in counts.tolist()]
        return {"rows": rows, "terms": terms, "keys": list(self.keys),
                "grad_norm": self.grad_norm, "steps": self.steps, "started": self.started,
                "first_bad_step": self.first_bad_step.clone(),
                "step_counter": self.step_counter.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the window of :meth:`state_dict` (``started`` is on the training clock,
        which continues over resumes); ranks other than 0 start from zero sums."""
        rows, terms = [row.to(self.device) for row in state["rows"]], list(state["terms"])
        if self.world.rank > 0:
            rows, terms = [torch.zeros_like(row) for row in rows], [0] * len(terms)
        self.rows, self.terms, self.keys = rows, terms, tuple(state["keys"])
        norm = state["grad_norm"]
        self.grad_norm = None if norm is None else norm.to(self.device)
        self.steps, self.started = int(state["steps"]), float(state["started"])
        self.first_bad_step = state["first_bad_step"].to(self.device)
        self.step_counter = state["step_counter"].to(self.device)

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
