"""TONGA against a dense reference: the covariance of the recorded gradients, kept as a dense
P x P matrix with the same online recurrence and truncation, solved with torch.linalg."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from ngexp.curvature.products import flatten
from ngexp.curvature.tasks import Classification
from ngexp.optim.build import build_optimizer
from ngexp.optim.tonga import TONGA
from tests.helpers import compose, ngexp, read_summary, requires_fashion_mnist, run_dirs
from tests.preconditioning import sgd

TASK = Classification()
DAMPING = 0.05


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batches(count: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=generator)) for _ in range(count)]


class DenseTONGA:
    """The same algorithm with dense covariances, one per block of parameter indices."""

    def __init__(self, blocks: list[slice], rank: int, decay: float, refresh: int) -> None:
        self.blocks, self.rank, self.decay, self.refresh = blocks, rank, decay, refresh
        self.covariances = [None] * len(blocks)
        self.columns = [0] * len(blocks)

    def step(self, grad: Tensor) -> Tensor:
        direction = torch.empty_like(grad)
        for index, block in enumerate(self.blocks):
            g = grad[block]
            old = self.covariances[index]
            c = torch.outer(g, g) + (0 if old is None else self.decay * old)
            eye = torch.eye(len(g), dtype=g.dtype)
            direction[block] = torch.linalg.solve(c + DAMPING * eye, g)
            self.columns[index] += 1
            if self.columns[index] == self.rank + self.refresh:  # keep the top-k eigenpairs
                values, vectors = torch.linalg.eigh(c)
                top = vectors[:, -self.rank:]
                c = top @ torch.diag(values[-self.rank:]) @ top.T
                self.columns[index] = self.rank
            self.covariances[index] = c
        return direction


def grad_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    model.zero_grad()
    TASK.loss(model(x), y).backward()
    return flatten([p.grad for p in model.parameters()]).clone()


@pytest.mark.parametrize("blocks", ["layer", "model"])
@pytest.mark.parametrize("rank, refresh", [(2, 3), (40, 1)])
def test_directions_and_covariance_match_the_dense_recurrence(blocks: str, rank: int,
                                                              refresh: int) -> None:
    """12 steps: every direction equals (C_t + damping I)^-1 g_t with C_t kept densely
    (C_t = decay C_{t-1} + g_t g_t^T, truncated to its top ``rank`` eigenpairs every ``refresh``
    steps once full; rank 40 never truncates), and X X^T equals C_t."""
    model, reference_model = tiny(), tiny()
    pre = TONGA(model, rank=rank, decay=0.9, damping=DAMPING, refresh_interval=refresh,
                blocks=blocks, kl_clip=None)
    opt = sgd(model, lr=0.1)
    sizes = [p.numel() for p in model.parameters()]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    if blocks == "layer":
        slices = [slice(bounds[0], bounds[2]), slice(bounds[2], bounds[4])]
    else:
        slices = [slice(0, bounds[-1])]
    dense = DenseTONGA(slices, rank, 0.9, refresh)
    for x, y in batches(12):
        g = grad_of(reference_model, x, y)
        expected = dense.step(g)
        opt.zero_grad()
        TASK.loss(model(x), y).backward()
        assert torch.equal(flatten([p.grad for p in model.parameters()]), g)
        pre.step()
        direction = flatten([p.grad for p in model.parameters()])
        torch.testing.assert_close(direction, expected, rtol=1e-9, atol=1e-12)
        for covariance, c in zip(pre.covariances.values(), dense.covariances, strict=True):
            x_cols = covariance.x
            torch.testing.assert_close(x_cols @ x_cols.T, c, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(covariance.g, x_cols.T @ x_cols, rtol=1e-9, atol=1e-12)
            assert covariance.count <= rank + refresh
        opt.step()
        with torch.no_grad():
            for mine, theirs in zip(reference_model.parameters(), model.parameters(),
                                    strict=True):
                mine.copy_(theirs)
    assert set(pre.covariances) == ({"0", "2"} if blocks == "layer" else {""})


def test_held_coordinates_stay_zero_and_the_rest_is_the_free_subspace_solve() -> None:
    """With a mask, d_F = (C_FF + damping I)^-1 g_F of the masked gradients' covariance and 0 on
    the held coordinates, from a covariance that already had columns before the mask came."""
    model = tiny()
    pre = TONGA(model, rank=10, decay=0.8, damping=DAMPING, blocks="model", kl_clip=None)
    opt = sgd(model, lr=0.1)
    data = batches(4)
    mask = (torch.rand_like(model[0].weight, generator=None) > 0.4).double()
    history = []
    for step, (x, y) in enumerate(data):
        if step == 2:
            pre.restrict_to({model[0].weight: mask})
        opt.zero_grad()
        TASK.loss(model(x), y).backward()
        if step >= 2:
            model[0].weight.grad *= mask  # as the pruning callback masks gradients
        history.append(flatten([p.grad for p in model.parameters()]).clone())
        pre.step()
        direction = flatten([p.grad for p in model.parameters()])
        opt.step()
    keep = flatten([mask if p is model[0].weight else torch.ones_like(p)
                    for p in model.parameters()]).bool()
    c = sum(0.8 ** (len(history) - 1 - i) * torch.outer(g * keep, g * keep)
            for i, g in enumerate(history))
    free = c[keep][:, keep] + DAMPING * torch.eye(int(keep.sum()), dtype=torch.float64)
    expected = torch.linalg.solve(free, history[-1][keep])
    torch.testing.assert_close(direction[keep], expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(direction[~keep], torch.zeros(int((~keep).sum()), dtype=torch.float64))


def test_accumulated_micro_batches_give_the_direction_of_their_union() -> None:
    """TONGA reads only .grad: two halves with loss / 2 each step as the whole batch does."""
    directions = []
    for micro in (1, 2):
        model = tiny()
        pre = TONGA(model, rank=2, refresh_interval=1, damping=DAMPING)
        opt = sgd(model, lr=0.1)
        for x, y in batches(4):
            opt.zero_grad()
            for part in range(micro):
                rows = slice(part * 8 // micro, (part + 1) * 8 // micro)
                (TASK.loss(model(x[rows]), y[rows]) / micro).backward()
            pre.step()
            opt.step()
        directions.append(flatten([p.grad for p in model.parameters()]))
    torch.testing.assert_close(directions[1], directions[0], rtol=1e-9, atol=1e-12)


def training_run(state: dict | None = None) -> tuple[nn.Module, TONGA, torch.optim.Optimizer]:
    model = tiny()
    pre = TONGA(model, rank=2, refresh_interval=2, damping=DAMPING, kl_clip=1e-2)
    opt = sgd(model, lr=0.2, momentum=0.9)
    if state is None:
        data = batches(5)
    else:
        model.load_state_dict(state["model"])
        pre.load_state_dict(state["pre"])
        opt.load_state_dict(state["opt"])
        data = batches(3, seed=2)
    for x, y in data:
        opt.zero_grad()
        TASK.loss(model(x), y).backward()
        pre.step()
        opt.step()
    return model, pre, opt


def test_state_dict_round_trip_resumes_bit_identically() -> None:
    """5 steps, a checkpoint through torch.save/torch.load(weights_only=True), then 3 more steps
    from it equal 3 more steps of the original run; reset() forgets the covariance."""
    model, pre, opt = training_run()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "pre": pre.state_dict(),
                "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert {k: v["x"].shape[1] for k, v in saved["pre"]["blocks"].items()} == {"0": 3, "2": 3}
    for x, y in batches(3, seed=2):
        opt.zero_grad()
        TASK.loss(model(x), y).backward()
        pre.step()
        opt.step()
    resumed, resumed_pre, _ = training_run(copy.deepcopy(saved))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert pre.log_metrics() == resumed_pre.log_metrics()
    pre.reset()
    assert all(c.count == 0 for c in pre.covariances.values())


def test_config_builds_and_bad_values_are_one_line_errors() -> None:
    cfg = compose("optimizer=tonga", "optimizer.rank=3", "optimizer.blocks=model")
    built = build_optimizer(cfg.optimizer, tiny(), TASK)
    assert isinstance(built.preconditioner, TONGA)
    assert built.preconditioner.rank == 3 and set(built.preconditioner.covariances) == {""}
    group = built.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"]) == (1.0, 0.0)
    for key, value, expected in [("rank", 0, "an integer >= 1"), ("decay", 0.0, "(0, 1]"),
                                 ("refresh_interval", 0, "an integer >= 1")]:
        with pytest.raises(ValueError, match=rf"optimizer.{key}={value} is invalid.*"
                                             rf"{expected.replace('(', '.').replace(']', '.')}"):
            OmegaConf.to_object(compose("optimizer=tonga", f"optimizer.{key}={value}"))
    with pytest.raises(ValueError, match="blocks='unit'.*layer, model"):
        TONGA(tiny(), blocks="unit")
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        TONGA(tiny()).step()


@requires_fashion_mnist
def test_learns_fashion_mnist_from_the_command_line(tmp_path: Path) -> None:
    ngexp("train", "optimizer=tonga", "data.subset=2000", "trainer.max_steps=40",
          "trainer.device=cpu", "trainer.progress=none", f"output_root={tmp_path}")
    [run] = run_dirs(tmp_path)
    summary = read_summary(run)
    assert summary["status"] == "completed"
    assert summary["final"]["test/acc"] > 0.6, summary["final"]  # chance: 0.1
