"""Losses, metrics and output-space curvature of the supported tasks.

A task turns model outputs into the training loss and the evaluation metrics, and knows the
model's predictive distribution, which second-order methods need:

- ``sample_targets`` draws targets from that distribution (Monte-Carlo Fisher, Martens & Grosse
  2015, Sec. 5);
- ``hessian_vector_product`` multiplies by the Hessian of the per-term loss with respect to the
  outputs, H_L, so that the generalized Gauss-Newton matrix is G = J^T H_L J (Schraudolph 2002);
- ``hessian_factor`` gives the columns of a factor S with H_L = S S^T (exact diagonal GGN,
  BackPACK's DiagGGN, Dangel et al. 2020).

For both losses here (softmax cross-entropy, Bernoulli with logits) the output is the natural
parameter, so H_L is also the Fisher of the predictive distribution and GGN = Fisher.

All losses are means over the ``num_terms`` independent terms of a batch (examples, or tokens
for a language model), so a per-term gradient is ``num_terms`` times the batch gradient of that
term. Sampling and output curvature run in float32 whatever the outputs' dtype (bf16 autocast),
and non-finite outputs never raise (a diverged run ends by its loss, not inside the sampler).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def at_least_float32(tensor: Tensor) -> Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def finite_or_uniform(probs: Tensor) -> Tensor:
    """``probs (..., C)`` with every row holding a non-finite value replaced by the uniform
    distribution, without a host sync (``torch.multinomial`` rejects such rows, on CUDA with a
    device-side assert that ends the process)."""
    good = torch.isfinite(probs).all(-1, keepdim=True)
    return torch.where(good, probs, torch.full_like(probs, 1.0 / probs.shape[-1]))


class Task:
    """Interface; see the module docstring."""

    #: Config name of the task (``DataSpec.task``).
    name: str = "task"
    #: Metric names reported by :meth:`finalize`, besides ``loss``.
    metric_names: tuple[str, ...] = ()

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def targets(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """What :meth:`loss` compares the outputs with, for a batch of ``inputs`` and the data
        set's ``labels``: the labels."""
        return labels

    def num_terms(self, targets: Tensor) -> int:
        """Number of terms averaged in :meth:`loss`."""
        return targets.shape[0]

    def output_terms(self, outputs: Tensor) -> int:
        """Number of terms of the loss on ``outputs`` (the targets share their leading shape)."""
        return outputs.shape[0]

    def metric_sums(self, outputs: Tensor, targets: Tensor,
                    loss: Tensor | None = None) -> dict[str, Tensor]:
        """Sums over the batch (0-dim tensors) of ``loss`` and each metric, for exact averages.
        A ``loss`` already computed by :meth:`loss` on this batch is reused, not recomputed."""
        raise NotImplementedError

    def loss_sum(self, outputs: Tensor, targets: Tensor, loss: Tensor | None) -> Tensor:
        if loss is not None:
            return loss.detach().float() * self.num_terms(targets)
        return self.loss(outputs.float(), targets) * self.num_terms(targets)

    def finalize(self, sums: dict[str, float], count: int) -> dict[str, float]:
        """Averages from accumulated :meth:`metric_sums` over ``count`` terms."""
        return {key: value / count for key, value in sums.items()}

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def hessian_vector_product(self, outputs: Tensor, vector: Tensor) -> Tensor:
        """H_L v for each term, same shape as ``outputs``; H_L of the per-term loss."""
        raise NotImplementedError

    def hessian_factor(self, outputs: Tensor, block: int) -> Iterator[Tensor]:
        """Columns of S with H_L = S S^T for outputs ``(B, C)``, ``block`` at a time, as
        ``(k, B, C)`` tensors (``[j, n]`` is column j of S_n), float32."""
        raise NotImplementedError


class Classification(Task):
    """Softmax cross-entropy. Outputs ``(B, C)`` logits (or ``(B, T, C)``, one term per step)."""

    name = "classification"
    metric_names = ("acc",)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten())

    def num_terms(self, targets: Tensor) -> int:
        return targets.numel()

    def output_terms(self, outputs: Tensor) -> int:
        return outputs[..., 0].numel()

    def metric_sums(self, outputs: Tensor, targets: Tensor,
                    loss: Tensor | None = None) -> dict[str, Tensor]:
        correct = outputs.argmax(-1) == targets
        return {"loss": self.loss_sum(outputs, targets, loss), "acc": correct.sum().float()}

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.softmax(at_least_float32(outputs.detach()).flatten(0, -2), dim=-1)
        samples = torch.multinomial(finite_or_uniform(probs), 1, generator=generator)
        return samples.squeeze(-1).view(outputs.shape[:-1])

    def hessian_vector_product(self, outputs: Tensor, vector: Tensor) -> Tensor:
        """(diag(p) - p p^T) v with p = softmax(outputs)."""
        probs = torch.softmax(outputs, dim=-1)
        return probs * vector - probs * (probs * vector).sum(-1, keepdim=True)

    def hessian_factor(self, outputs: Tensor, block: int) -> Iterator[Tensor]:
        """H = diag(p) - p p^T = S S^T with S = diag(sqrt p) - p sqrt(p)^T, because
        sqrt(p)^T sqrt(p) = 1; column c is sqrt(p_c) (e_c - p)."""
        probs = torch.softmax(at_least_float32(outputs), dim=-1)
        roots = probs.sqrt()
        for begin in range(0, outputs.shape[-1], block):
            columns = torch.arange(begin, min(begin + block, outputs.shape[-1]),
                                   device=outputs.device)
            factor = -probs[None] * roots.T[columns][:, :, None]
            factor[torch.arange(len(columns), device=outputs.device), :, columns] += \
                roots[:, columns].T
            yield factor


class LanguageModel(Classification):
    """Next-token cross-entropy over ``(B, T, V)`` outputs; also reports bits per character."""

    name = "language_model"
    metric_names = ("acc", "bpc")

    def finalize(self, sums: dict[str, float], count: int) -> dict[str, float]:
        means = super().finalize(sums, count)
        means["bpc"] = means["loss"] / math.log(2)
        return means


class Reconstruction(Task):
    """Bernoulli output with logits ``(B, D)``; loss = binary cross-entropy summed over the
    ``D`` outputs of one example, averaged over examples (the deep-autoencoder objective of
    Hinton & Salakhutdinov 2006 and Martens 2010). Targets are the flattened inputs in [0, 1].
    ``mse`` is the summed squared error of the mean output, per example."""

    name = "reconstruction"
    metric_names = ("mse",)

    def targets(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """The flattened inputs ``(B, D)``: a reconstruction ignores the labels."""
        return inputs.flatten(1)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        targets = targets.flatten(1)
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum") / len(targets)

    def metric_sums(self, outputs: Tensor, targets: Tensor,
                    loss: Tensor | None = None) -> dict[str, Tensor]:
        error = torch.sigmoid(outputs.float()) - targets.flatten(1)
        return {"loss": self.loss_sum(outputs, targets, loss), "mse": error.square().sum()}

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.sigmoid(at_least_float32(outputs.detach()))
        probs = torch.where(torch.isfinite(probs), probs, 0.5)
        return torch.bernoulli(probs, generator=generator)

    def hessian_vector_product(self, outputs: Tensor, vector: Tensor) -> Tensor:
        """diag(p (1 - p)) v with p = sigmoid(outputs)."""
        probs = torch.sigmoid(outputs)
        return probs * (1 - probs) * vector

    def hessian_factor(self, outputs: Tensor, block: int) -> Iterator[Tensor]:
        """H = diag(p (1 - p)): column d is sqrt(p_d (1 - p_d)) e_d."""
        probs = torch.sigmoid(at_least_float32(outputs))
        roots = (probs * (1 - probs)).sqrt()
        for begin in range(0, outputs.shape[-1], block):
            columns = torch.arange(begin, min(begin + block, outputs.shape[-1]),
                                   device=outputs.device)
            factor = probs.new_zeros(len(columns), *probs.shape)
            factor[torch.arange(len(columns), device=outputs.device), :, columns] = \
                roots[:, columns].T
            yield factor


TASKS: dict[str, type[Task]] = {task.name: task for task in
                                (Classification, Reconstruction, LanguageModel)}


def build_task(kind: str | Task) -> Task:
    """A task by name (``classification``, ``reconstruction``, ``language_model``) or as given."""
    if isinstance(kind, Task):
        return kind
    if kind not in TASKS:
        raise ValueError(f"task={kind!r} is invalid: expected one of {', '.join(TASKS)}")
    return TASKS[kind]()
