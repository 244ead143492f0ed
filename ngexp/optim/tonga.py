"""TONGA: the natural gradient with an online low-rank covariance of the gradients (Le Roux,
Manzagol & Bengio 2008, "Topmoumoute online natural gradient algorithm", NIPS; Sec. 3-4).

The direction is ``(C + lambda I)^-1 g`` with ``C`` the *uncentered covariance of the
gradients* (the empirical Fisher of the minibatch gradients, not of per-example ones), kept
online with exponential forgetting:

    C_t = gamma C_{t-1} + g_t g_t^T,

where ``g_t`` is the step's minibatch gradient (the paper's online variant: one gradient per
step). ``C_t = X_t X_t^T`` is never formed: ``X_t = [sqrt(gamma) X_{t-1}, g_t]`` holds at most
``rank + refresh_interval`` columns, and its Gram matrix ``G_t = X_t^T X_t`` is updated in
``O(P m)`` per step (``m`` columns),

    G_t = [[gamma G_{t-1},            sqrt(gamma) X_{t-1}^T g_t],
           [sqrt(gamma) g_t^T X_{t-1}, g_t^T g_t               ]].

Every ``refresh_interval`` steps (the paper's ``b``), once ``X`` has ``rank + refresh_interval``
columns, ``C`` is truncated to its ``k = rank`` leading eigendirections through the small Gram
matrix: ``G = V D V^T``, the eigenvectors of ``C`` are ``U = X V D^-1/2``, and ``X <- X V_k``
(``= U_k D_k^1/2``), ``G <- D_k``, so ``C <- U_k D_k U_k^T``.

The direction uses the Woodbury identity on the Gram matrix: ``(X X^T + lambda I)^-1 g =
(g - X (G + lambda I)^-1 X^T g) / lambda``; since ``g_t`` is the last column of ``X_t``
(``g = X e_m``) this is exactly ``X (G + lambda I)^-1 e_m``: one ``m x m`` solve and one ``P x
m`` product per block.

Block-diagonal (the paper's block-diagonal approximation, Sec. 4): ``blocks=layer`` keeps one
``(X, G)`` per module owning parameters (a Linear/Conv layer's weight and bias together),
``blocks=model`` one for the whole model. Parameters held at zero (:meth:`restrict_to`, pruned
weights) are removed from every column, and ``G`` recomputed, at each step.

The step: the torch optimizer steps ``.grad = direction`` (the preset: SGD, lr 1, no
momentum). Since ``g_t`` is in the span of ``X_t``, ``g^T d = g^T (C + lambda I)^-1 g < 1`` per
block: the step is bounded in the metric of ``C``, and KL clipping is off by default (on, it
bounds ``lr^2 <d, g>``; ``kl_clip=0.01`` with ``lr=1`` cut the steps tenfold and left the MLP at
33% test accuracy after 100 steps on 2000 Fashion-MNIST images, against 81% without). The
damping sets where TONGA is a natural gradient (eigenvalues of ``C``, about ``|g|^2 / (1 -
gamma)``, above it: early training) and where SGD with ``lr / damping`` (below it: the new
component of each gradient, and late training): with ``damping=0.1`` the novel components got
steps of ``lr |g| / (|g|^2 + 0.1)``, about a constant size, and the MLP stalled at a constant lr
(the measurements: ``docs/second_order.md``). Memory: ``P (rank + refresh_interval)`` floats.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from ngexp.curvature.products import flatten
from ngexp.optim.hyperparams import Hyperparameter, check_hyperparameter, value_at
from ngexp.optim.kl_clip import KLBlock
from ngexp.optim.preconditioner import Preconditioner
from ngexp.optim.training import base_optimizer
from ngexp.options import check_integer, check_range, checked, configurable


def check_tonga(damping: Any, rank: int, decay: float, refresh_interval: int,
                **_: Any) -> None:
    check_hyperparameter("damping", damping)
    check_integer("rank", rank, 1)
    check_range("decay", decay, 0, 1, closed="(]")
    check_integer("refresh_interval", refresh_interval, 1)


class LowRankCovariance:
    """``C = X X^T`` for one block of ``P`` parameters, with ``X (P, m)`` and ``G = X^T X (m,
    m)``; see the module docstring."""

    def __init__(self, params: list[Tensor], rank: int, refresh_interval: int) -> None:
        self.params = params
        self.rank, self.refresh_interval = rank, refresh_interval
        size = sum(p.numel() for p in params)
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        self.columns = params[0].new_zeros(size, rank + refresh_interval, dtype=dtype)
        self.gram = params[0].new_zeros(rank + refresh_interval, rank + refresh_interval,
                                        dtype=dtype)
        self.count = 0

    @property
    def x(self) -> Tensor:
        return self.columns[:, :self.count]

    @property
    def g(self) -> Tensor:
        return self.gram[:self.count, :self.count]

    def update(self, grad: Tensor, decay: float, keep: Tensor | None) -> None:
        """``C <- decay C + grad grad^T`` (``grad (P,)``); with ``keep`` (P,) the held
        coordinates are zeroed in every column and ``G`` recomputed."""
        m = self.count
        scale = decay**0.5
        x = self.columns[:, :m].mul_(scale)
        self.columns[:, m] = grad
        if keep is not None:
            self.columns[:, :m + 1] *= keep[:, None]
            x = self.columns[:, :m + 1]
            self.gram[:m + 1, :m + 1] = x.T @ x
        else:
            cross = x.T @ grad
            self.gram[:m, :m] *= decay
            self.gram[:m, m] = cross
            self.gram[m, :m] = cross
            self.gram[m, m] = grad @ grad
        self.count = m + 1

    def direction(self, damping: float) -> Tensor:
        """``(C + damping I)^-1 g`` (P,) for ``g``, the last column added."""
        m = self.count
        system = self.g + damping * torch.eye(m, dtype=self.gram.dtype, device=self.gram.device)
        last = torch.zeros(m, 1, dtype=self.gram.dtype, device=self.gram.device)
        last[-1] = 1.0
        return self.x @ torch.linalg.solve_ex(system, last)[0][:, 0]  # no host sync

    def refresh_due(self) -> bool:
        return self.count == self.rank + self.refresh_interval

    def truncate(self) -> None:
        """Keep the ``rank`` leading eigendirections of ``C`` (``G = V D V^T``, ``X <- X
        V_k``, ``G <- D_k``), computed in float64."""
        values, vectors = torch.linalg.eigh(self.g.double())
        values, vectors = values[-self.rank:].clamp_min(0), vectors[:, -self.rank:]
        x = self.x @ vectors.to(self.columns.dtype)
        self.clear()
        self.columns[:, :self.rank] = x
        self.gram[:self.rank, :self.rank] = torch.diag(values).to(self.gram.dtype)
        self.count = self.rank

    def clear(self) -> None:
        self.columns.zero_()
        self.gram.zero_()
        self.count = 0

    def state(self) -> dict[str, Tensor]:
        return {"x": self.x.clone(), "gram": self.g.clone()}

    def load(self, state: dict[str, Tensor]) -> None:
        m = state["x"].shape[1]
        self.clear()
        self.columns[:, :m] = state["x"]
        self.gram[:m, :m] = state["gram"]
        self.count = m


@configurable("optimizer", "tonga", extends=base_optimizer,
              defaults={"lr": 1.0, "momentum": 0.0})
@checked(check_tonga)
class TONGA(Preconditioner):
    """TONGA preconditioner (module docstring): ``TONGA(model, rank=..., decay=...,
    damping=...)``."""

    data_parallel = True  # from the DDP-averaged gradients alone

    def __init__(self, model: nn.Module, *, rank: int = 5, decay: float = 0.99,
                 damping: Hyperparameter = 3.0, refresh_interval: int = 5,
                 blocks: Literal["layer", "model"] = "layer",
                 kl_clip: Hyperparameter | None = None, **options: Any) -> None:
        super().__init__(model, kl_clip=kl_clip, **options)
        self.rank, self.decay, self.damping = rank, decay, damping
        self.refresh_interval, self.blocks = refresh_interval, blocks
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        groups: dict[str, list[str]] = {}
        for name in trained:
            owner = name.rpartition(".")[0] if blocks == "layer" else ""
            groups.setdefault(owner, []).append(name)
        #: The covariance of each block, by module name ("" for the whole model).
        self.covariances = {owner: LowRankCovariance([trained[n] for n in names], rank,
                                                     refresh_interval)
                            for owner, names in groups.items()}

    def _precondition_grads(self) -> list[KLBlock]:
        damping = value_at(self.damping, self.steps)
        blocks: list[KLBlock] = []
        for covariance in self.covariances.values():
            params = covariance.params
            if all(p.grad is None for p in params):
                continue
            grad = flatten([p.grad if p.grad is not None else torch.zeros_like(p)
                            for p in params]).to(covariance.columns.dtype)
            keep = None
            if any(p in self.keep_masks for p in params):
                keep = flatten([self.keep_masks.get(p, torch.ones_like(p))
                                for p in params]).to(grad.dtype)
                grad = keep * grad
            covariance.update(grad, self.decay, keep)
            direction = covariance.direction(damping)
            if covariance.refresh_due():
                covariance.truncate()
            stepped = []
            for p, d in zip(params, direction.split([p.numel() for p in params]), strict=True):
                if p.grad is not None:
                    p.grad.copy_(d.view_as(p))
                    stepped.append(p)
            blocks.append((stepped, torch.dot(direction, grad)))
        if not blocks:
            raise RuntimeError("TONGA.step(): no parameter has a gradient; call loss.backward() "
                               "before step()")
        return blocks

    def reset(self) -> None:
        for covariance in self.covariances.values():
            covariance.clear()
        super().reset()

    def log_metrics(self) -> dict[str, float]:
        return {"damping": float(value_at(self.damping, max(self.steps - 1, 0))),
                **super().log_metrics()}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["blocks"] = {owner: covariance.state()
                           for owner, covariance in self.covariances.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["blocks"]) != set(self.covariances):
            raise ValueError(f"TONGA state for blocks {sorted(state['blocks'])}, the model has "
                             f"{sorted(self.covariances)}")
        for owner, covariance in self.covariances.items():
            covariance.load(state["blocks"][owner])
        super().load_state_dict(state)
