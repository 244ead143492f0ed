"""``trainer.precision=fp16``: float16 autocast with ``torch.amp.GradScaler`` on the CPU, from
the command line and through the training optimizer; loss scaling does not change the step,
overflowing steps are skipped, the scaler's state is checkpointed."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngexp.cli import main
from ngexp.errors import UserError
from ngexp.optim.training import TrainingOptimizer
from ngexp.train.checkpoint import read_checkpoint, save_checkpoint
from ngexp.train.precision import grad_scaler
from tests.helpers import read_metrics, read_summary, run_dirs
from tests.step_path import trainer_for

SYNTHETIC = ["data=synthetic", "data.shape=[1,8,8]", "data.num_train=256", "data.num_test=64",
             "trainer.batch_size=32", "trainer.log_every=1", "trainer.progress=none",
             "trainer.device=cpu"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "kfac", "ekfac"])
def test_fp16_trains_from_the_cli_close_to_fp32(optimizer: str, tmp_path: Path) -> None:
    """Five steps of the MLP in fp16 (K-FAC and EKFAC: through their ``grad_scaler=``) end
    within float16 rounding of the fp32 run, far from the start; every step is logged with the
    grad scaler's scale."""
    runs = {}
    for precision in ("fp32", "fp16"):
        root = tmp_path / precision
        assert main(["train", *SYNTHETIC, f"optimizer={optimizer}", "trainer.max_steps=5",
                     "model.widths=[32]", f"trainer.precision={precision}",
                     f"output_root={root}"]) == 0
        [runs[precision]] = run_dirs(root)
        assert read_summary(runs[precision])["status"] == "completed"
    records = [r for r in read_metrics(runs["fp16"]) if "train/loss" in r]
    assert [r["optim/grad_scale"] for r in records] == [65536.0] * 5  # no overflow, no growth
    torch.manual_seed(0)
    start = nn.Linear(64, 32).weight  # the scale of a change: a fresh layer's weights
    fp16, fp32 = weights(runs["fp16"]), weights(runs["fp32"])
    moved = (fp32["layers.0.weight"] - start).abs().max()
    assert moved > 0.01
    for key in fp32:
        torch.testing.assert_close(fp16[key], fp32[key], rtol=0, atol=2e-3)


def tiny_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return model, torch.randn(16, 6), torch.randint(0, 3, (16,))


def scaled_steps(scaler: torch.amp.GradScaler | None, steps: int,
                 dtype: torch.dtype | None = None) -> tuple[nn.Module, TrainingOptimizer]:
    model, x, y = tiny_problem()
    optimizer = TrainingOptimizer(torch.optim.Adam(model.parameters(), lr=0.01),
                                  grad_scaler=scaler)
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
            outputs = model(x)
            loss = F.cross_entropy(outputs, y)
        optimizer.backward(loss, outputs, y)
        optimizer.step()
    return model, optimizer


def test_loss_scale_does_not_change_the_step() -> None:
    """In float32, a power-of-two loss scale is exact: the weights after 3 Adam steps equal the
    unscaled run's bit for bit, and the gradients seen after backward are the true ones."""
    plain, _ = scaled_steps(None, 3)
    scaled, optimizer = scaled_steps(torch.amp.GradScaler("cpu", init_scale=1024.0), 3)
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a.grad, b.grad)
    assert optimizer.log_metrics() == {"grad_scale": 1024.0}


def test_overflowing_step_is_skipped_and_the_scale_halved() -> None:
    """A scale of 2^40 overflows float16 gradients: the step leaves the weights and Adam's state
    untouched and halves the scale; it is not a failure."""
    model, *_ = tiny_problem()
    start = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    skipped, optimizer = scaled_steps(scaler, 1, torch.float16)
    for before, after in zip(start, skipped.parameters(), strict=True):
        assert torch.equal(before, after)
    assert optimizer.optimizer.state == {}
    assert scaler.get_scale() == 2.0**39


def test_resume_restores_the_scaler_bit_identically(tmp_path: Path) -> None:
    """12 fp16 steps with a scale that backs off and grows, against 5 steps, a checkpoint
    written and read back into a fresh trainer, and 7 more: the same weights, Adam state and
    scaler state, bit for bit."""
    overrides = [*SYNTHETIC, "optimizer=adam", "trainer.precision=fp16", "model.widths=[16]"]
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(32, 1, 8, 8, generator=generator),
                torch.randint(0, 10, (32,), generator=generator)) for _ in range(12)]

    def fresh(name: str):  # noqa: ANN202 - a Trainer
        trainer = trainer_for(tmp_path / name, *overrides)
        trainer.optimizer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30,
                                                            growth_interval=3)
        return trainer

    reference = fresh("reference")
    for batch in batches:
        reference.train_step(*batch)
    interrupted = fresh("interrupted")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the skipped first step is expected: no warning
        interrupted.train_step(*batches[0])
    for batch in batches[1:5]:
        interrupted.train_step(*batch)
    save_checkpoint(tmp_path / "last.pt", interrupted.state_dict())
    resumed = trainer_for(tmp_path / "resumed", *overrides)  # a default scaler, then restored
    resumed.load_state_dict(read_checkpoint(tmp_path / "last.pt"))
    for batch in batches[5:]:
        resumed.train_step(*batch)
    final, expected = resumed.state_dict(), reference.state_dict()
    assert expected["optimizer"]["grad_scaler"]["scale"] < 2.0**30  # it backed off
    assert final["optimizer"]["grad_scaler"] == expected["optimizer"]["grad_scaler"]
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key
    for key, state in expected["optimizer"]["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(final["optimizer"]["optimizer"]["state"][key][name], value)


def test_fp16_unsupported_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert grad_scaler("bf16", torch.device("cpu")) is None
    assert isinstance(grad_scaler("fp16", torch.device("cpu")), torch.amp.GradScaler)
    monkeypatch.delattr(torch.amp, "GradScaler")
    with pytest.raises(UserError, match=r"^trainer.precision=fp16 is not supported on the cpu "
                                        r"by torch .*; choices there: fp32, bf16$"):
        grad_scaler("fp16", torch.device("cpu"))
