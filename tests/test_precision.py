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
from ngexp.curvature.tasks import Classification
from ngexp.errors import UserError
from ngexp.optim.ekfac import EKFAC
from ngexp.optim.kfac import KFAC
from ngexp.optim.kronecker_preconditioner import KroneckerPreconditioner
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


def scaled_kronecker_steps(kind: type[KroneckerPreconditioner],
                           batches: list[tuple[torch.Tensor, torch.Tensor]], *,
                           poison: int | None = None,
                           generator_at: tuple[int, torch.Tensor] | None = None,
                           **options) -> tuple[nn.Module, KroneckerPreconditioner,
                                               list[torch.Tensor | None], float]:
    """SGD steps on ``batches`` with ``kind`` and a GradScaler at 2^10: the model, the
    preconditioner, its MC generator state after each step and the final scale. At step
    ``poison`` one gradient entry is made inf after the backward: the scaler finds it and skips
    the step, the recorded statistics themselves stay finite. ``generator_at = (i, state)``
    sets the MC generator to ``state`` before step ``i`` (through the state dict)."""
    model, _, _ = tiny_problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    pre = kind(model, grad_scaler=scaler, cov_update_freq=1, **{"kl_clip": None, **options})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    generators = []
    for step, (x, y) in enumerate(batches):
        if generator_at is not None and generator_at[0] == step:
            pre.load_state_dict({**pre.state_dict(), "generator": generator_at[1]})
        opt.zero_grad()
        pre.backward(scaler.scale(Classification().loss(model(x), y)))
        if step == poison:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        pre.step()
        scaler.step(opt)
        scaler.update()
        generators.append(pre.state_dict()["generator"])
    return model, pre, generators, scaler.get_scale()


@pytest.mark.parametrize("inv_update_freq", [1, 100], ids=["refresh-every-step", "refresh-once"])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
@pytest.mark.parametrize("kind", [KFAC, EKFAC], ids=["kfac", "ekfac"])
@pytest.mark.parametrize("poison", [0, 3])
def test_a_skipped_step_is_the_run_without_its_batch(kind, fisher_type, inv_update_freq,
                                                     poison) -> None:
    """An overflowing step in a run of 6 (the first, or one in the middle) equals the run of
    the 5 other batches: the same weights, factors and terms, bit for bit; only that step's
    estimates are counted as skipped. Exact: a power-of-two loss scale (2^10 here, 2^9 after
    the skip in the skipped run) commutes with float32 rounding, so both runs compute the same
    numbers; the steps later count the 1/k equal-weight average (and EKFAC's s average) from
    the estimates that entered. With ``cov_update_freq=1`` and refreshes every step or only at
    the first, the step index the skip shifts changes no schedule; the MC reference continues
    from the skipped run's generator, which also drew targets at the skipped step."""
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 6, generator=generator),
                torch.randint(0, 3, (16,), generator=generator)) for _ in range(6)]
    options = {"fisher_type": fisher_type, "inv_update_freq": inv_update_freq}
    if kind is EKFAC:
        options["scale_decay"] = 0.9  # a running s: its count matters
    skipped, pre, generators, scale = scaled_kronecker_steps(kind, batches, poison=poison,
                                                             **options)
    assert scale == 2.0**9  # the scaler saw the overflow
    kept = batches[:poison] + batches[poison + 1:]
    continue_at = None if fisher_type == "empirical" else (poison, generators[poison])
    reference, reference_pre, _, _ = scaled_kronecker_steps(kind, kept, generator_at=continue_at,
                                                            **options)
    for a, b in zip(skipped.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    curvature, expected = pre.curvature(), reference_pre.curvature()
    assert set(curvature) == set(expected) == {"0", "2"}
    for name, state in expected.items():
        assert set(curvature[name]) == set(state)
        for key, value in state.items():
            assert torch.equal(curvature[name][key], value), (name, key)
    # per layer A and G, and EKFAC's s once a basis exists (not at the first step)
    estimates_per_layer = 3 if kind is EKFAC and poison > 0 else 2
    assert pre.log_metrics()["skipped_statistics"] == 2 * estimates_per_layer
    assert reference_pre.log_metrics()["skipped_statistics"] == 0


def test_a_skipped_step_drops_its_kl_clipping_without_a_warning(recwarn) -> None:
    """With KL clipping on, the step the scaler skips leaves its KL blocks unused, as it
    should: no warning that no optimizer stepped (a real missing step still warns)."""
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 6, generator=generator),
                torch.randint(0, 3, (16,), generator=generator)) for _ in range(3)]
    scaled_kronecker_steps(KFAC, batches, poison=1, kl_clip=1e-2)
    assert not [w for w in recwarn if "kl_clip was not applied" in str(w.message)]
    model, _, _ = tiny_problem()
    pre = KFAC(model, grad_scaler=torch.amp.GradScaler("cpu"))
    x, y = batches[0]
    pre.backward(pre.grad_scaler.scale(Classification().loss(model(x), y)))
    pre.grad_scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    pre.step()  # a finite step, and no optimizer step after it
    with pytest.warns(UserWarning, match="kl_clip was not applied"):
        pre.backward(Classification().loss(model(batches[1][0]), batches[1][1]))


def test_fp16_unsupported_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert grad_scaler("bf16", torch.device("cpu")) is None
    assert isinstance(grad_scaler("fp16", torch.device("cpu")), torch.amp.GradScaler)
    monkeypatch.delattr(torch.amp, "GradScaler")
    with pytest.raises(UserError, match=r"^trainer.precision=fp16 is not supported on the cpu "
                                        r"by torch .*; choices there: fp32, bf16$"):
        grad_scaler("fp16", torch.device("cpu"))
