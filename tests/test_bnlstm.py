"""The batch-normalized LSTM against a direct implementation of Cooijmans et al. (2016),
Eqs. 5-8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, requires_fashion_mnist
from omegaconf import OmegaConf
from torch import Tensor

from ngexp.data.bundle import DataBundle
from ngexp.data.sequences import sequence_data
from ngexp.data.spec import DataSpec
from ngexp.models.bnlstm import BNLSTM

SPEC = DataSpec("toy", (6, 3), 4, mean=(0.3,), std=(0.7,))
HIDDEN = 5


def make_model(bn: str, spec: DataSpec = SPEC, **kwargs) -> BNLSTM:
    torch.manual_seed(0)
    model = BNLSTM(spec, hidden_size=HIDDEN, bn=bn, **kwargs).double()
    with torch.no_grad():  # move every parameter off its special initial value
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model


def reference(model: BNLSTM, x: Tensor, h0: Tensor) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """The LSTM equations one step at a time with explicit statistics.

    Returns the logits and, per step, the batch mean/variance that training mode uses."""
    H = model.hidden_size
    if model.language_model:
        x = F.one_hot(x, model.input_map.in_features).double()
    else:
        x = (x - model.standardize.mean.flatten()) / model.standardize.std.flatten()
    w_x, w_h, b = model.input_map.weight, model.recurrent_map.weight, model.bias
    h, c = h0, torch.zeros_like(h0)
    hs, stats = [], []

    def bn(z: Tensor, module, t: int, key: str, record: dict) -> Tensor:
        if module is None:
            return z
        if model.training:
            mean = z.mean(0)
            var = ((z - mean) ** 2).mean(0)
        else:
            k = min(t, int(module.trained_steps) - 1)
            mean, var = module.running_mean[k], module.running_var[k]
        record[key] = (mean.detach(), var.detach())
        beta = module.bias if module.bias is not None else 0.0
        return beta + module.weight * (z - mean) / torch.sqrt(var + module.eps)

    for t in range(x.shape[1]):
        record: dict = {}
        pre = bn(h @ w_h.T, model.bn_h, t, "h", record) + bn(x[:, t] @ w_x.T, model.bn_x, t,
                                                             "x", record) + b
        f, i, o, g = pre[:, :H], pre[:, H:2 * H], pre[:, 2 * H:3 * H], pre[:, 3 * H:]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(bn(c, model.bn_c, t, "c", record))
        hs.append(h)
        stats.append(record)
    head = model.head
    if model.language_model:
        return torch.stack(hs, 1) @ head.weight.T + head.bias, stats
    return h @ head.weight.T + head.bias, stats


def grads(model: BNLSTM, out: Tensor) -> list[Tensor]:
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * weights).sum(), list(model.parameters()))


@pytest.mark.parametrize("bn", ["all", "input", "none"])
def test_training_mode_matches_equations(bn: str) -> None:
    model = make_model(bn, h0_noise_std=0.5)
    x = torch.rand(8, 6, 3, dtype=torch.float64)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)  # the model's first random draw is the h0 noise
    h0 = 0.5 * torch.randn(8, HIDDEN, dtype=torch.float64)
    expected, _ = reference(model, x, h0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    # back-propagation through the per-step batch statistics as well
    for got, want in zip(grads(model, out), grads(model, expected), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("bn", ["all", "input"])
def test_population_statistics_per_step(bn: str) -> None:
    model = make_model(bn, h0_noise_std=0.0, bn_momentum=0.25)
    x = torch.rand(8, 6, 3, dtype=torch.float64)
    model(x)
    _, stats = reference(model, x, torch.zeros(8, HIDDEN, dtype=torch.float64))
    for key, module in (("x", model.bn_x), ("h", model.bn_h), ("c", model.bn_c)):
        if module is None:
            continue
        mean = torch.stack([step[key][0] for step in stats])
        var = torch.stack([step[key][1] for step in stats]) * 8 / 7  # unbiased
        torch.testing.assert_close(module.running_mean, 0.25 * mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(module.running_var, 0.75 + 0.25 * var, rtol=0, atol=1e-12)
        assert int(module.trained_steps) == 6
    # each step has its own statistics
    assert not torch.allclose(model.bn_x.running_mean[1], model.bn_x.running_mean[4])

    model.eval()
    x_test = torch.rand(5, 6, 3, dtype=torch.float64)
    expected, _ = reference(model, x_test, torch.zeros(5, HIDDEN, dtype=torch.float64))
    out = model(x_test)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    # evaluation is deterministic and per example (no batch statistics)
    torch.testing.assert_close(model(x_test[:2]), out[:2], rtol=0, atol=1e-12)


def test_steps_past_training_length_reuse_last_statistics() -> None:
    model = make_model("all", h0_noise_std=0.0)  # keeps statistics for 6 steps
    model(torch.rand(8, 4, 3, dtype=torch.float64))  # trained on 4 steps only
    assert int(model.bn_h.trained_steps) == 4
    # untrained rows keep their initial values, so clamping to step 3 matters
    assert not torch.allclose(model.bn_h.running_mean[3], model.bn_h.running_mean[4])
    model.eval()
    x = torch.rand(5, 11, 3, dtype=torch.float64)  # longer than the buffers, too
    expected, _ = reference(model, x, torch.zeros(5, HIDDEN, dtype=torch.float64))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-9)
    model.train()
    with pytest.raises(ValueError, match="longer than the 6 steps"):
        model(torch.rand(8, 7, 3, dtype=torch.float64))


def test_frozen_running_statistics() -> None:
    """``track_running_stats = False`` (what curvature products set): batch statistics, no
    update."""
    model = make_model("all", h0_noise_std=0.0)
    x = torch.rand(8, 6, 3, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for module in (model.bn_x, model.bn_h, model.bn_c):
        module.track_running_stats = False
    out = model(x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    expected, _ = reference(model, x, torch.zeros(8, HIDDEN, dtype=torch.float64))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


def test_language_model_outputs_every_step() -> None:
    spec = DataSpec("chars", (7,), 9, "language_model")
    model = make_model("all", spec=spec, h0_noise_std=0.0)
    tokens = torch.randint(0, 9, (6, 7))
    out = model(tokens)
    assert out.shape == (6, 7, 9)
    expected, _ = reference(model, tokens, torch.zeros(6, HIDDEN, dtype=torch.float64))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


def test_initialization() -> None:
    torch.manual_seed(0)
    H = 8
    model = BNLSTM(DataSpec("toy", (5, 3), 4), hidden_size=H, bn="all")
    for module in (model.bn_x, model.bn_h, model.bn_c):
        assert torch.equal(module.weight, torch.full_like(module.weight, 0.1))
    assert model.bn_x.bias is None and model.bn_h.bias is None
    assert torch.equal(model.bn_c.bias, torch.zeros(H))
    assert torch.equal(model.bias, torch.cat([torch.ones(H), torch.zeros(3 * H)]))  # forget = 1
    w_h = model.recurrent_map.weight
    assert torch.equal(w_h[3 * H:], torch.eye(H))  # g block: identity
    torch.testing.assert_close(w_h[:3 * H].T @ w_h[:3 * H], torch.eye(H))  # f, i, o: orthogonal
    w_x = model.input_map.weight
    torch.testing.assert_close(w_x.T @ w_x, torch.eye(3))
    other = BNLSTM(DataSpec("toy", (5, 3), 4), hidden_size=H, recurrent_init="orthogonal")
    g = other.recurrent_map.weight[3 * H:]
    torch.testing.assert_close(g @ g.T, torch.eye(H))
    assert not torch.allclose(g, torch.eye(H))


def test_linear_maps_called_once_and_once_per_step() -> None:
    """What the curvature hooks see: W_x once on (B, T, D), W_h once per step on (B, H)."""
    model = BNLSTM(SPEC, hidden_size=HIDDEN)
    seen: dict[str, list[tuple[int, ...]]] = {"x": [], "h": []}
    model.input_map.register_forward_hook(lambda m, a, o: seen["x"].append(tuple(a[0].shape)))
    model.recurrent_map.register_forward_hook(lambda m, a, o: seen["h"].append(tuple(a[0].shape)))
    model(torch.rand(4, 6, 3))
    assert seen == {"x": [(4, 6, 3)], "h": [(4, HIDDEN)] * 6}


def test_bad_config_values() -> None:
    with pytest.raises(ValueError, match="model.bn='layer' is invalid: expected one of all"):
        OmegaConf.to_object(compose("model=bnlstm", "model.bn=layer"))
    with pytest.raises(ValueError, match="hidden_size=0"):
        BNLSTM(DataSpec("seq", (28, 28), 10), hidden_size=0)
    with pytest.raises(Exception, match="needs sequences"):
        BNLSTM(DataSpec("img", (1, 28, 28), 10))


def train_and_test(data: DataBundle, steps: int = 200) -> float:
    """RMSProp (clipped at 1) on random batches of 64, then test accuracy on 2000 examples."""
    torch.manual_seed(0)
    model = BNLSTM(data.spec, hidden_size=64, bn="all")
    optimizer = torch.optim.RMSprop(model.parameters(), lr=2e-3, alpha=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(0, len(data.train), (64,), generator=generator)
        loss = F.cross_entropy(model(data.train.inputs[index]), data.train.targets[index])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = model(data.test.inputs[:2000]).argmax(1)
    return (predictions == data.test.targets[:2000]).float().mean().item()


@requires_fashion_mnist
def test_learns_row_by_row_fashion_mnist() -> None:
    """A short real-data run: BN-LSTM on 28-step row sequences, well above 10% chance."""
    data = sequence_data("fashion_mnist", order="row", subset=6000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (64, 400) products: one thread is fastest, and robust to load
    try:
        accuracy = train_and_test(data)
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.6, accuracy


@pytest.mark.parametrize("experiment", ["bnlstm_seq_mnist", "bnlstm_pseq_mnist",
                                        "bnlstm_row_fashion_mnist"])
def test_experiment_configs_compose(experiment: str) -> None:
    cfg = compose(f"+experiment={experiment}")
    OmegaConf.to_object(cfg)  # schema range checks
    assert cfg.model._target_ == "ngexp.models.bnlstm.BNLSTM"
    assert cfg.data._target_ == "ngexp.data.sequences.sequence_data"
    assert cfg.trainer.grad_clip == 1.0 and cfg.optimizer.alpha == 0.9
