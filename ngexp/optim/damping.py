"""The Levenberg-Marquardt rule that adapts a damping from the reduction ratio (Moré 1978;
Martens 2010, Sec. 4.1; Martens & Grosse 2015, Sec. 6.5), shared by K-FAC/EKFAC's
``damping_schedule=adaptive`` and Hessian-free.

With ``rho = (h(w + delta) - h(w)) / M(delta)``, the actual over the predicted change of the
objective for the step ``delta`` (``M`` the quadratic model, ``M(0) = 0``): the model is
trusted more, the damping multiplied by ``shrink < 1``, when ``rho > 3/4``; less, the damping
divided by ``shrink``, when ``rho < 1/4``; a model that predicts no decrease (``M(delta) >=
0``) also divides it. K-FAC uses ``shrink = (19/20)^T1``, Hessian-free ``2/3`` (so ``* 3/2``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def levenberg_marquardt(damping: Tensor, rho: Tensor, predicted: Tensor,
                        shrink: float) -> Tensor:
    """The next damping (a 0-dim tensor, no host sync) from ``rho`` and ``predicted = M(delta)``
    (0-dim tensors; module docstring)."""
    down, up = damping.new_tensor(shrink), damping.new_tensor(1 / shrink)  # damping's dtype
    factor = torch.where(rho > 0.75, down, torch.where(rho < 0.25, up, torch.ones_like(up)))
    return damping * torch.where(predicted < 0, factor, up)
