"""Gradient flow through a recurrence: how much of the loss's gradient reaches each time step.

For a recurrent model whose ``run(x, noise, on_state)`` lets an observer see each hidden state
``h_t (B, H)``, ``t = 1..T`` (:class:`~ngexp.models.bnlstm.BNLSTM`), the norms

    n_t = || dL / dh_t ||_F,   L = (1 / B) sum_i loss(f(x_i), y_i),

of the total derivative of the mean loss over a batch with respect to each hidden state (every
path through later steps included). This is the quantity of Cooijmans et al. (2016, Sec. 4,
Fig. 1): with a batch-norm scale ``gamma`` near 1 the tanh saturates and ``n_t`` vanishes
towards the first steps; ``gamma = 0.1`` keeps it flowing.

The model runs as in a training forward: batch statistics, and the ``h_0`` noise of training.
Without that noise a step whose hidden state is the same for every example (``h_0 = 0``, or a
background pixel that every image shares) has zero batch variance, and its batch norm's
derivative ``gamma / sqrt(eps)`` blows the gradient up; the noise is there to prevent exactly
that (Sec. 5.1). The noise is drawn from forked random states and the buffers (the batch
norms' population statistics) are restored after, so measuring never changes training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ngexp.curvature.tasks import Task
from ngexp.errors import UserError


def hidden_gradient_norms(model: nn.Module, task: Task, inputs: Tensor,
                          targets: Tensor) -> Tensor:
    """``n_t`` of the module docstring for ``t = 1..T``: a ``(T,)`` tensor (float32)."""
    if not callable(getattr(model, "run", None)):
        raise UserError(f"the gradient flow needs a recurrent model (model=bnlstm, lstm, "
                        f"lstm_bn_input); {type(model).__name__} has no hidden states to watch")
    states: list[Tensor] = []

    def record(_: int, h: Tensor) -> Tensor:
        states.append(h)
        return h

    buffers = [buffer.clone() for buffer in model.buffers()]
    was_training = model.training
    model.train()
    devices = [inputs.device] if inputs.is_cuda else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            loss = task.loss(model.run(inputs, noise=True, on_state=record), targets)
            grads = torch.autograd.grad(loss, states)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
    return torch.stack([grad.float().norm() for grad in grads])


def flow_metrics(norms: Tensor) -> dict[str, float]:
    """``grad_h_t<t>`` at ``t = 1, T/4, T/2, 3T/4, T`` (rounded up), and ``first_over_last`` =
    ``n_1 / n_T``: how much of the last step's gradient reaches the first."""
    steps = len(norms)
    marks = sorted({1, *(-(-steps * k // 4) for k in (1, 2, 3)), steps})
    values = {f"grad_h_t{t}": float(norms[t - 1]) for t in marks}
    values["first_over_last"] = float(norms[0] / norms[-1].clamp_min(1e-30))
    return values
