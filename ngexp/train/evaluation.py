"""Evaluating a run's model on whole splits (data-parallel: each rank its shard, the metric
sums summed over the ranks before anything is logged)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ngexp.data.bundle import eval_batches
from ngexp.train.build import Run
from ngexp.train.ranks import sum_over_ranks


class Evaluator:
    """Loss and task metrics of the run's model over its splits."""

    def __init__(self, run: Run) -> None:
        self.run = run

    @torch.no_grad()
    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Loss and metrics averaged over a whole split (``test``, ``val`` or ``train``)."""
        run = self.run
        data = getattr(run.data, split)
        if run.world.distributed:  # this rank's shard
            data = data.shard(run.world.rank, run.world.size)
        was_training = run.model.training
        run.model.eval()
        sums: dict[str, Tensor] = {}
        count = 0
        for inputs, targets in eval_batches(data, run.settings.eval_batch_size):
            inputs = run.memory_format(inputs)
            targets = run.task.targets(inputs, targets)
            with run.autocast():
                outputs = run.eval_forward(inputs)
            for key, value in run.task.metric_sums(outputs, targets).items():
                sums[key] = sums[key] + value if key in sums else value
            count += run.task.num_terms(targets)
        run.model.train(was_training)
        totals = torch.stack(list(sums.values()))
        if run.world.distributed:  # every shard's sums
            totals, count = sum_over_ranks(totals, count)
        values = dict(zip(sums, totals.tolist(), strict=True))
        return run.task.finalize(values, count)

    def evaluate_splits(self) -> dict[str, float]:
        """``val/...`` and ``test/...`` of the splits the data has, after the model estimated
        its population statistics where it does so."""
        self.estimate_population_statistics()
        metrics: dict[str, float] = {}
        for split in ("val", "test"):
            if getattr(self.run.data, split) is not None:
                metrics.update({f"{split}/{k}": v for k, v in self.evaluate(split).items()})
        return metrics

    def train_batches(self, num_examples: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The first ``num_examples`` training examples in order, unaugmented (for curvature)."""
        split = self.run.data.train
        for begin in range(0, min(num_examples, len(split)), batch_size):
            end = min(begin + batch_size, num_examples, len(split))
            inputs = split.inputs[begin:end]
            yield inputs, self.run.task.targets(inputs, split.targets[begin:end])

    def estimate_population_statistics(self) -> None:
        """For a model that estimates its batch norms' population statistics from training
        batches before it is evaluated (the BN-LSTM's ``population_stats=training_set``): the
        training split in order, unaugmented, at the training batch size (the model stops
        reading when it has seen enough)."""
        estimate = getattr(self.run.model, "estimate_population_statistics", None)
        if estimate is None:
            return
        with torch.no_grad():
            estimate(inputs for inputs, _ in self.train_batches(len(self.run.data.train),
                                                                self.run.global_batch))
