"""Variational pruning (``prune=variational_bernoulli|spike_and_slab``): the KL terms against
closed forms and Monte Carlo, gates that reach 0/1, physical removal equal to gating, the
data-size scaling, resume and the command line."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.distributions import (
    Bernoulli,
    Beta,
    Categorical,
    MixtureSameFamily,
    Normal,
    kl_divergence,
)

from ngexp.curvature.tasks import build_task
from ngexp.optim.training import TrainingOptimizer
from ngexp.prune.gates import (
    bernoulli_kl,
    beta_log_prob_logit,
    concrete,
    gaussian_kl,
    scale_mixture_log_prob,
)
from ngexp.prune.variational import SpikeAndSlab, VariationalBernoulli
from tests.helpers import (
    InterruptAfter,
    build_trainer,
    compose,
    read_summary,
    requires_fashion_mnist,
    run_dirs,
)

# ---------------------------------------------------------------------------- closed forms
MC = 400_000


def test_bernoulli_kl_equals_torch_and_monte_carlo() -> None:
    pi = torch.tensor([0.02, 0.3, 0.5, 0.9, 0.999], dtype=torch.float64)
    prior = 0.1
    exact = bernoulli_kl(torch.logit(pi), prior)
    assert torch.allclose(exact, kl_divergence(Bernoulli(pi), Bernoulli(torch.full_like(
        pi, prior))), rtol=1e-12, atol=1e-14)
    generator = torch.Generator().manual_seed(0)
    z = torch.bernoulli(pi.expand(MC, -1), generator=generator)
    ratio = Bernoulli(pi).log_prob(z) - Bernoulli(torch.full_like(pi, prior)).log_prob(z)
    tolerance = 5 * ratio.std(0) / math.sqrt(MC)
    assert ((ratio.mean(0) - exact).abs() <= tolerance + 1e-12).all()
    # gates at 0 and 1 (logits far beyond float32's sigmoid): finite KL, finite gradients
    logit = torch.tensor([-200.0, 200.0], requires_grad=True)
    kl = bernoulli_kl(logit, 0.25)
    kl.sum().backward()
    assert kl.tolist() == pytest.approx([-math.log(0.75), -math.log(0.25)])
    assert torch.isfinite(logit.grad).all()


def test_beta_hyper_prior_and_scale_mixture_are_their_densities() -> None:
    logit = torch.linspace(-8, 8, 17, dtype=torch.float64)
    for a, b in ((0.5, 0.5), (2.0, 0.7)):
        expected = Beta(torch.tensor(a, dtype=torch.float64),
                        torch.tensor(b, dtype=torch.float64)).log_prob(torch.sigmoid(logit))
        assert torch.allclose(beta_log_prob_logit(logit, a, b), expected, rtol=1e-9)
    w = torch.linspace(-3, 3, 101, dtype=torch.float64)
    mixture = MixtureSameFamily(Categorical(torch.tensor([0.3, 0.7], dtype=torch.float64)),
                                Normal(torch.zeros(2, dtype=torch.float64),
                                       torch.tensor([1.5, 0.02], dtype=torch.float64)))
    assert torch.allclose(scale_mixture_log_prob(w, 0.3, 1.5, 0.02), mixture.log_prob(w),
                          rtol=1e-12)


def test_gaussian_kl_equals_torch_and_monte_carlo() -> None:
    mu = torch.tensor([0.0, 0.5, -1.2], dtype=torch.float64)
    log_var = torch.tensor([-9.0, -1.0, 0.3], dtype=torch.float64)
    exact = gaussian_kl(mu, log_var, 0.8)
    q = Normal(mu, (0.5 * log_var).exp())
    p = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64))
    assert torch.allclose(exact, kl_divergence(q, p), rtol=1e-12)
    w = q.sample((MC,))
    ratio = q.log_prob(w) - p.log_prob(w)
    assert ((ratio.mean(0) - exact).abs() <= 5 * ratio.std(0) / math.sqrt(MC)).all()


def test_concrete_gates_are_bernoulli_at_low_temperature() -> None:
    pi = torch.tensor([0.1, 0.5, 0.8])
    uniform = torch.rand(MC, 3, generator=torch.Generator().manual_seed(1))
    z = concrete(torch.logit(pi), uniform, temperature=0.01)
    # P(z > 1/2) = P(logit + logistic noise > 0) = pi exactly, at any temperature
    frequency = (z > 0.5).double().mean(0)
    assert torch.allclose(frequency, pi.double(), atol=5 * 0.5 / math.sqrt(MC))
    assert ((z < 1e-3) | (z > 1 - 1e-3)).double().mean() > 0.97


# ---------------------------------------------------------------------------- units
def fake_trainer(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
    """What the variational pruners use of a trainer."""
    logged: list[dict[str, float]] = []
    return SimpleNamespace(
        model=model, data=SimpleNamespace(train=SimpleNamespace(inputs=inputs, targets=targets)),
        task=build_task("classification"), generator=torch.Generator().manual_seed(0),
        console=Console(quiet=True), step=0, total_steps=10**9, logged=logged,
        log=logged.append)


def mlp(batch_norm: bool = False, widths: tuple[int, ...] = (12, 10)) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = 6
    for width in widths:
        layers += [nn.Linear(fan_in, width)]
        layers += [nn.BatchNorm1d(width)] if batch_norm else []
        layers += [nn.Tanh()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, 3))


class LeNetLike(nn.Module):
    """Conv -> BN -> ReLU -> pool -> conv -> ReLU -> flatten (4 positions per channel) ->
    Linear -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(5, 4, 3), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(4 * 2 * 2, 7), nn.ReLU(), nn.Linear(7, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.out(h + torch.relu(self.b(h)))


def bound(pruner: VariationalBernoulli | SpikeAndSlab, model: nn.Module,
          inputs: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
    targets = torch.zeros(len(inputs), dtype=torch.long) if targets is None else targets
    trainer = fake_trainer(model, inputs, targets)
    pruner.on_model_built(trainer)
    pruner.on_train_start(trainer)
    return trainer


@pytest.mark.parametrize("make, shape, kind", [
    (mlp, (6,), VariationalBernoulli), (lambda: mlp(batch_norm=True), (6,), SpikeAndSlab),
    (LeNetLike, (2, 8, 8), VariationalBernoulli), (LeNetLike, (2, 8, 8), SpikeAndSlab)])
def test_removed_units_give_the_outputs_of_the_gated_network(make, shape, kind) -> None:
    torch.manual_seed(0)
    model = make()
    inputs = torch.randn(16, *shape)
    pruner = kind()
    trainer = bound(pruner, model, inputs)
    assert pruner.links is not None
    model.train()
    model(inputs).sum().backward()  # batch norm statistics move, gradients exist
    model.eval()
    sizes = {}
    for name in pruner.layers:  # fix every gate: about half to 0, one unit kept on
        gates = pruner.gates(name)
        state = (torch.rand(len(gates.state)) < 0.5).float()
        state[0] = 1.0
        gates.state.copy_(state)
        sizes[name] = int(state.sum())
    with torch.no_grad():
        gated = model(inputs)
        pruner.fix(trainer, pruner.fix_below, pruner.fix_above)  # nothing random: removes only
        pruner.fix(trainer, 0.5, 0.5)
        removed = model(inputs)
    assert {name: len(pruner.gates(name).state) for name in pruner.layers} == sizes
    assert {name: len(kept) for name, kept in pruner.kept.items()} == sizes
    assert torch.allclose(removed, gated, rtol=0, atol=1e-6)
    report = pruner.report()
    assert report["prune/units_alive"] == sum(sizes.values())
    own = {id(p) for g in pruner.bank.values() for p in g.parameters()}
    assert report["prune/params"] == sum(p.numel() for p in model.parameters()
                                         if id(p) not in own)
    assert report["prune/params"] < report["prune/params_dense"]
    assert report["prune/flops"] < report["prune/flops_dense"]


def test_a_residual_model_keeps_its_units_gated_and_says_so() -> None:
    model, inputs = Residual(), torch.randn(8, 6)
    pruner = VariationalBernoulli()
    with pytest.warns(UserWarning, match="not a plain chain"):
        trainer = bound(pruner, model, inputs)
    assert pruner.links is None
    model.eval()
    pruner.gates("a").state.copy_(torch.tensor([0.0, 1, 1, 0, 1, 1]))
    pruner.gates("b").state.fill_(1.0)
    with torch.no_grad():
        before = model(inputs)
        pruner.fix(trainer, 0.5, 0.5)
        assert model.a.weight.shape == (6, 6) and torch.equal(model(inputs), before)
    report = pruner.report()
    assert report["prune/units_alive"] == 10
    assert report["prune/nonzero_params"] == report["prune/params"] - 2 * 7  # rows + biases


def test_the_kl_is_scaled_by_the_number_of_training_terms() -> None:
    model, inputs = mlp(), torch.randn(40, 6)
    small, large = VariationalBernoulli(kl_weight=0.5), VariationalBernoulli(kl_weight=0.5)
    bound(small, model, inputs)
    bound(large, mlp(), torch.randn(400, 6))
    large.model.load_state_dict(small.model.state_dict())
    trainer = SimpleNamespace(step=0)
    term = small.loss_term(trainer)
    assert torch.allclose(term, small.kl() * 0.5 / 40, rtol=1e-6)
    assert torch.allclose(large.loss_term(trainer) * 10, term, rtol=1e-6)
    warming = VariationalBernoulli(kl_weight=0.5, kl_warmup_steps=3)
    bound(warming, mlp(), torch.randn(40, 6))
    warming.model.load_state_dict(small.model.state_dict())
    for step, fraction in ((0, 0.25), (2, 0.75), (3, 1.0), (50, 1.0)):
        trainer.step = step
        assert torch.allclose(warming.loss_term(trainer), fraction * term, rtol=1e-6)
    # the terms of the ELBO: gate KLs and hyper-prior of the random gates, weight priors
    gates = small.gates("1")
    expected = (bernoulli_kl(gates.logit, 0.1).sum()
                - beta_log_prob_logit(gates.logit, 0.5, 0.5).sum())
    gates2 = small.gates("3")
    expected += (bernoulli_kl(gates2.logit, 0.1).sum()
                 - beta_log_prob_logit(gates2.logit, 0.5, 0.5).sum())
    expected -= sum(scale_mixture_log_prob(m.weight, 0.5, 1.0, 0.02).sum()
                    for m in model.modules() if isinstance(m, nn.Linear))
    assert torch.allclose(small.kl(), expected, rtol=1e-6)


def test_spike_and_slab_kl_and_local_reparameterization() -> None:
    torch.manual_seed(0)
    model, inputs = mlp(widths=(5,)), torch.randn(8, 6)
    pruner = SpikeAndSlab(layer_prior_pi=[0.3], init_log_var=-2.0, prior_std=0.7)
    bound(pruner, model, inputs)
    gates, layer = pruner.gates("1"), model[1]
    gates.state[1] = 0.0  # a gate fixed to 0: no KL at all; fixed to 1: the slab's KL
    gates.state[2] = 1.0
    slab = gaussian_kl(layer.weight, gates.log_var, 0.7).sum(1)
    pi = gates.pi()
    expected = sum(bernoulli_kl(gates.logit[j], 0.3) + pi[j] * slab[j]
                   for j in (0, 3, 4)) + slab[2]
    assert torch.allclose(pruner.kl(), expected, rtol=1e-6)
    # the noise of the pre-activations: variance sum_i x_i^2 sigma_ji^2 (Kingma et al. 2015)
    model.train()
    x = inputs[:1].expand(20_000, -1)
    with torch.no_grad():
        captured = []
        handle = layer.register_forward_hook(lambda _m, _a, out: captured.append(out))
        gates.state.fill_(1.0)
        model(x)
        handle.remove()
    variance = (x[0] ** 2) @ gates.log_var.exp().T
    # the hooks run in order: ours (noise, gate) first, then this one sees the noisy output
    empirical = captured[0].var(0)
    assert torch.allclose(empirical, variance, rtol=5 * math.sqrt(2 / 20_000))
    mean = nn.functional.linear(x[0], layer.weight, layer.bias).detach()
    assert torch.allclose(captured[0].mean(0), mean,
                          atol=5 * float(variance.detach().max().sqrt()) / math.sqrt(20_000))


def test_gates_of_useless_units_reach_zero_and_the_others_one() -> None:
    """Two informative inputs, four pure-noise inputs; 16 hidden units where two would do."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 6, generator=generator)
    targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()
    torch.manual_seed(0)
    model = mlp(widths=(16,))
    pruner = VariationalBernoulli(fix_every=25, prior_pi=0.05, init_pi=0.8)
    trainer = bound(pruner, model, inputs, targets)
    optimizer = TrainingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    trainer.optimizer, trainer.total_steps = optimizer, 600
    for step in range(600):
        trainer.step = step
        pruner.on_step_start(trainer)
        batch = torch.randint(256, (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        (loss + pruner.loss_term(trainer)).backward()
        optimizer.step()
    trainer.step = 600
    pruner.on_epoch_end(trainer)
    states = pruner.gates("1").state
    assert ((states == 0) | (states == 1)).all()
    assert 2 <= model[1].out_features <= 8  # removed: at least half of the 16 units
    assert pruner.report()["prune/random_gates"] == 0
    model.eval()
    with torch.no_grad():
        accuracy = (model(inputs).argmax(1) == targets).float().mean()
    assert accuracy > 0.9


# ---------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("preset, optimizer, kl_weight", [("variational_bernoulli", "kfac", 3),
                                                          ("spike_and_slab", "ekfac", 0.02)])
def test_resume_after_a_kill_is_bit_identical(tmp_path: Path, preset: str, optimizer: str,
                                              kl_weight: float) -> None:
    """Units are removed before and after the kill; K-FAC/EKFAC precondition the shrinking
    layers and leave the gates their plain gradient."""
    from ngexp.train.session import run_session
    from ngexp.train.stop import RunInterrupted

    overrides = ["data=synthetic", "data.shape=[1,8,8]", "data.num_train=96",
                 "data.num_test=32", "model=mlp", "model.widths=[24,16]",
                 "data.labels=linear", f"optimizer={optimizer}", f"prune={preset}",
                 f"prune.kl_weight={kl_weight}",
                 "prune.fix_every=4", "prune.fix_below=0.3", "prune.init_pi=0.6",
                 "prune.kl_warmup_steps=0",
                 "trainer.batch_size=16", "trainer.epochs=4", "trainer.progress=none",
                 "trainer.log_every=2", "trainer.deterministic=true"]
    choices = {"model": "mlp"}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    for folder in (reference, resumed):
        folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(compose(*overrides), choices, reference)
        coverage = trainer.optimizer.preconditioner.coverage.describe("x")
        assert "variational_gates" in coverage
        run_session(trainer)
        trainer = build_trainer(compose(*overrides), choices, resumed)
        trainer.callbacks.append(InterruptAfter(10))
        with pytest.raises(RunInterrupted):
            run_session(trainer)
        middle = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
        run_session(build_trainer(compose(*overrides), choices, resumed))
    final = [torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
             for folder in (reference, resumed)]
    kept = middle["callbacks"]["pruner"]["kept"]
    assert sum(len(k) for k in kept.values()) < 40  # removed before the kill
    assert sum(len(k) for k in final[0]["callbacks"]["pruner"]["kept"].values()) < sum(
        len(k) for k in kept.values())  # and after
    assert final[0]["model"].keys() == final[1]["model"].keys()
    for key, value in final[0]["model"].items():
        assert torch.equal(value, final[1]["model"][key]), key
    summaries = [read_summary(folder)["final"] for folder in (reference, resumed)]
    timing = ("examples_per_s", "step_time_ms", "peak_mem_mb")
    assert {k: v for k, v in summaries[0].items() if not k.endswith(timing)} == {
        k: v for k, v in summaries[1].items() if not k.endswith(timing)}


@requires_fashion_mnist
def test_command_line_run_on_fashion_mnist_learns_and_prunes(tmp_path: Path) -> None:
    from ngexp.cli import main

    code = main(["train", "model=lenet5", "prune=variational_bernoulli", "data.subset=2000",
                 "trainer.max_steps=75", "prune.fix_every=15",
                 "trainer.progress=none", f"output_root={tmp_path}"])
    assert code in (0, None)
    [run] = run_dirs(tmp_path)
    final = read_summary(run)["final"]
    assert final["test/acc"] > 0.5
    assert final["prune/channel_sparsity"] > 0.02 and final["prune/random_gates"] == 0
    assert final["prune/params"] < final["prune/params_dense"]
    assert final["prune/flops"] < final["prune/flops_dense"]
