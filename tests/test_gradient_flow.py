"""The gradient-flow instrument against brute force: per-step gradients from a perturbation
added at one step at a time, the last step's gradient in closed form, a measurement that
leaves the model's buffers and the random stream alone, and the callback from the CLI on real
Fashion-MNIST (logged at the steps it is due, training bit-identical)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ngexp.cli import main
from ngexp.curvature.tasks import Classification
from ngexp.data.spec import DataSpec
from ngexp.errors import UserError
from ngexp.instruments.flow import flow_metrics, hidden_gradient_norms
from ngexp.models.bnlstm import BNLSTM
from tests.helpers import read_metrics, requires_fashion_mnist, run_dirs

SPEC = DataSpec("toy", (9, 3), 4, mean=(0.3,), std=(0.7,))


def model_and_batch(bn: str, gamma_init: float = 0.1) -> tuple[BNLSTM, torch.Tensor,
                                                                torch.Tensor]:
    torch.manual_seed(0)
    model = BNLSTM(SPEC, hidden_size=5, bn=bn, gamma_init=gamma_init).double()
    inputs = torch.rand(6, 9, 3, dtype=torch.float64)
    return model, inputs, torch.randint(0, 4, (6,))


def perturbed_gradient(model: BNLSTM, inputs: torch.Tensor, targets: torch.Tensor,
                       step: int, seed: int) -> torch.Tensor:
    """dL/dh_step as the gradient of a zero perturbation added to h_step alone (the h_0 noise
    of training drawn after ``torch.manual_seed(seed)``)."""
    delta = torch.zeros(len(inputs), model.hidden_size, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(seed)
    logits = model.run(inputs, noise=True,
                       on_state=lambda t, h: h + delta if t == step else h)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, targets), delta)
    return grad


@pytest.mark.parametrize("bn", ["all", "input", "none"])
def test_norms_equal_a_perturbation_at_each_step(bn: str) -> None:
    model, inputs, targets = model_and_batch(bn)
    torch.manual_seed(7)  # the noise the measurement draws (from forked states)
    norms = hidden_gradient_norms(model, Classification(), inputs, targets)
    model.train()
    brute = torch.stack([perturbed_gradient(model, inputs, targets, t, seed=7).norm()
                         for t in range(1, 10)])
    assert norms.shape == (9,)
    torch.testing.assert_close(norms, brute.float(), rtol=1e-5, atol=1e-9)


def test_last_step_gradient_in_closed_form() -> None:
    """dL/dh_T = (softmax(z) - onehot(y)) W_head / B for the mean cross-entropy."""
    model, inputs, targets = model_and_batch("all")
    torch.manual_seed(7)
    norms = hidden_gradient_norms(model, Classification(), inputs, targets)
    model.train()
    torch.manual_seed(7)
    logits = model.run(inputs, noise=True)
    closed = (logits.softmax(1) - F.one_hot(targets, 4)) @ model.head.weight / len(inputs)
    assert float(norms[-1]) == pytest.approx(float(closed.detach().norm()), rel=1e-6)


def test_measuring_keeps_buffers_mode_and_random_stream() -> None:
    model, inputs, targets = model_and_batch("all")
    model.eval()
    buffers = [b.clone() for b in model.buffers()]
    state = torch.get_rng_state()
    hidden_gradient_norms(model, Classification(), inputs, targets)
    assert not model.training
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_the_noise_of_training_keeps_a_constant_first_input_from_exploding() -> None:
    """Sequences that all begin with the same pixel: without h_0 noise the first steps have no
    batch variance and their batch norms amplify the gradient by ~gamma / sqrt(eps); with the
    noise of training the gradient reaching h_1 stays of the order of the last step's."""
    model, inputs, targets = model_and_batch("all")
    inputs[:, :3] = 0.0
    noisy = hidden_gradient_norms(model, Classification(), inputs, targets)
    model.h0_noise_std = 0.0
    silent = hidden_gradient_norms(model, Classification(), inputs, targets)
    assert float(noisy[0] / noisy[-1]) < 10
    assert float(silent[0] / silent[-1]) > 100 * float(noisy[0] / noisy[-1])


def test_metrics_name_the_quarter_steps() -> None:
    values = flow_metrics(torch.arange(1.0, 10.0))
    assert values == {"grad_h_t1": 1.0, "grad_h_t3": 3.0, "grad_h_t5": 5.0, "grad_h_t7": 7.0,
                      "grad_h_t9": 9.0, "first_over_last": pytest.approx(1 / 9)}


def test_a_model_without_hidden_states_is_one_error() -> None:
    with pytest.raises(UserError, match="recurrent model"):
        hidden_gradient_norms(torch.nn.Linear(3, 4), Classification(), torch.rand(2, 3),
                              torch.tensor([0, 1]))


#: Row-by-row BN-LSTM (28 steps) on 400 images, batch 50: 8 steps.
ROWS = ["+experiment=bnlstm_row_fashion_mnist", "model.hidden_size=16", "data.subset=400",
        "data.val_size=0", "trainer.batch_size=50", "trainer.max_steps=8", "trainer.epochs=1",
        "trainer.log_every=2", "trainer.device=cpu", "trainer.progress=none", "logger=[]"]


@requires_fashion_mnist
def test_the_callback_logs_its_steps_and_leaves_training_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flow = ["callbacks=[gradient_flow]", "callbacks.gradient_flow.every_n_steps=4",
            "callbacks.gradient_flow.probe_size=40"]
    assert main(["train", *ROWS, f"output_root={tmp_path / 'plain'}"]) == 0
    assert main(["train", *ROWS, *flow, f"output_root={tmp_path / 'flow'}"]) == 0, \
        capsys.readouterr().err
    [plain], [measured] = run_dirs(tmp_path / "plain"), run_dirs(tmp_path / "flow")
    records = read_metrics(measured)
    logged = {r["step"]: r for r in records if "dynamics/flow/first_over_last" in r}
    assert sorted(logged) == [0, 4, 8]
    for record in logged.values():
        norms = [record[f"dynamics/flow/grad_h_t{t}"] for t in (1, 7, 14, 21, 28)]
        assert all(n > 0 for n in norms)
        assert record["dynamics/flow/first_over_last"] == pytest.approx(norms[0] / norms[-1])
    losses = [[r["train/loss"] for r in read_metrics(run) if "train/loss" in r]
              for run in (plain, measured)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    weights = [torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
               for run in (plain, measured)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@requires_fashion_mnist
def test_the_callback_on_a_feed_forward_model_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["train", "model=mlp", "data.subset=400", "trainer.max_steps=2",
               "trainer.progress=none", "logger=[]", "callbacks=[gradient_flow]",
               f"output_root={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "recurrent model" in err[0], err
