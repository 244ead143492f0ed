"""The batch-normalized LSTM against a direct implementation of Cooijmans et al. (2016),
Eqs. 5-8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from ngexp.data.bundle import DataBundle
from ngexp.data.sequences import sequence_data
from ngexp.data.spec import DataSpec
from ngexp.models.bnlstm import BNLSTM, StepwiseBatchNorm
from tests.helpers import compose, requires_fashion_mnist

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

    Returns the logits and, per step, the batch mean/variance that training mode uses (with
    shared statistics in training, the input term's are pooled over batch and time)."""
    H = model.hidden_size
    if model.language_model:
        x = F.one_hot(x, model.input_map.in_features).double()
    else:
        x = (x - model.standardize.mean.flatten()) / model.standardize.std.flatten()
    w_x, w_h, b = model.input_map.weight, model.recurrent_map.weight, model.bias
    h, c = h0, torch.zeros_like(h0)
    hs, stats = [], []
    pooled_x = None
    if model.training and model.bn_x is not None and model.bn_x.shared:
        z_x = x @ w_x.T
        pooled_x = z_x.mean((0, 1)), z_x.var((0, 1), unbiased=False)

    def bn(z: Tensor, module, t: int, key: str, record: dict) -> Tensor:
        if module is None:
            return z
        if model.training:
            if key == "x" and pooled_x is not None:
                mean, var = pooled_x
            else:
                mean = z.mean(0)
                var = ((z - mean) ** 2).mean(0)
        else:
            k = 0 if module.shared else min(t, int(module.trained_steps) - 1)
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
        cell = bn(c, model.bn_c, t, "c", record)
        if model.cell_bias is not None:
            cell = cell + model.cell_bias
        h = torch.sigmoid(o) * torch.tanh(cell)
        hs.append(h)
        stats.append(record)
    head = model.head
    if model.language_model:
        return torch.stack(hs, 1) @ head.weight.T + head.bias, stats
    return h @ head.weight.T + head.bias, stats


def pooled(stats: list[dict[str, Tensor]], key: str, n: int) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance over batch and time from per-step batch statistics of
    ``n`` examples (law of total variance)."""
    means = torch.stack([step[key][0] for step in stats])
    second = torch.stack([step[key][1] + step[key][0] ** 2 for step in stats]).mean(0)
    mean = means.mean(0)
    count = n * len(stats)
    return mean, (second - mean ** 2) * count / (count - 1)


def grads(model: BNLSTM, out: Tensor) -> list[Tensor]:
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * weights).sum(), list(model.parameters()))


@pytest.mark.parametrize(("bn", "options"), [
    ("all", {}), ("input", {}), ("none", {}), ("none", {"cell_shift": True}),
    ("input", {"cell_shift": True}), ("all", {"shared_statistics": True}),
    ("input", {"shared_statistics": True})])
def test_training_mode_matches_equations(bn: str, options: dict) -> None:
    model = make_model(bn, h0_noise_std=0.5, **options)
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


def norms(model: BNLSTM) -> list[tuple[str, StepwiseBatchNorm]]:
    return [(key, module) for key, module in (("x", model.bn_x), ("h", model.bn_h),
                                              ("c", model.bn_c)) if module is not None]


@pytest.mark.parametrize("bn", ["all", "input"])
def test_shared_statistics_pool_batch_and_time(bn: str) -> None:
    """The ablation of Sec. 3: one population row moved towards the batch statistics pooled over
    batch and time (the input term also normalized with them in training), used at every
    evaluation step."""
    model = make_model(bn, h0_noise_std=0.0, bn_momentum=0.25, shared_statistics=True)
    x = torch.rand(8, 6, 3, dtype=torch.float64)
    model(x)
    _, stats = reference(model, x, torch.zeros(8, HIDDEN, dtype=torch.float64))
    for key, module in norms(model):
        if key == "x":  # the reference's input statistics are pooled already
            mean, var = stats[0]["x"][0], stats[0]["x"][1] * 48 / 47
        else:
            mean, var = pooled(stats, key, 8)
        assert module.running_mean.shape == (1, mean.shape[0])
        torch.testing.assert_close(module.running_mean[0], 0.25 * mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(module.running_var[0], 0.75 + 0.25 * var, rtol=0, atol=1e-12)
    model.eval()
    x_test = torch.rand(5, 9, 3, dtype=torch.float64)  # longer than training: the same row
    expected, _ = reference(model, x_test, torch.zeros(5, HIDDEN, dtype=torch.float64))
    torch.testing.assert_close(model(x_test), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("shared", [False, True])
def test_training_set_population_statistics(shared: bool) -> None:
    """``population_stats=training_set``: averages of the minibatch statistics over training
    batches (unbiased variances), until ``population_examples`` examples are read; the initial
    state as in evaluation (no noise drawn)."""
    model = make_model("all", h0_noise_std=0.5, population_stats="training_set",
                       population_examples=20, shared_statistics=shared)
    model.eval()
    batches = [torch.rand(8, 6, 3, dtype=torch.float64) for _ in range(4)]
    rng = torch.get_rng_state()
    assert model.estimate_population_statistics(iter(batches)) == 3  # 24 >= 20 examples
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training and model.bn_h.momentum == 0.1 and model.estimated
    model.train()
    per_batch = [reference(model, x, torch.zeros(8, HIDDEN, dtype=torch.float64))[1]
                 for x in batches[:3]]
    model.eval()
    for key, module in norms(model):
        if not shared:
            estimates = [(torch.stack([step[key][0] for step in stats]),
                          torch.stack([step[key][1] for step in stats]) * 8 / 7)
                         for stats in per_batch]
        elif key == "x":
            estimates = [(stats[0]["x"][0][None], stats[0]["x"][1][None] * 48 / 47)
                         for stats in per_batch]
        else:
            estimates = [tuple(value[None] for value in pooled(stats, key, 8))
                         for stats in per_batch]
        mean = torch.stack([estimate[0] for estimate in estimates]).mean(0)
        var = torch.stack([estimate[1] for estimate in estimates]).mean(0)
        torch.testing.assert_close(module.running_mean, mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(module.running_var, var, rtol=0, atol=1e-12)
        assert int(module.trained_steps) == 6
    x_test = torch.rand(5, 6, 3, dtype=torch.float64)
    expected, _ = reference(model, x_test, torch.zeros(5, HIDDEN, dtype=torch.float64))
    torch.testing.assert_close(model(x_test), expected, rtol=0, atol=1e-9)
    # a training forward makes the estimate stale: evaluation says so
    model.train()
    model(batches[0])
    model.eval()
    with pytest.warns(UserWarning, match="estimate_population_statistics was not called"):
        model(x_test)


def test_moving_averages_ignore_estimation() -> None:
    model = make_model("all", h0_noise_std=0.0)
    model(torch.rand(8, 6, 3, dtype=torch.float64))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert model.estimate_population_statistics([torch.rand(8, 6, 3, dtype=torch.float64)]) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_h0_noise_always_also_in_evaluation() -> None:
    model = make_model("all", h0_noise_std=0.5, h0_noise="always")
    model(torch.rand(8, 6, 3, dtype=torch.float64))
    model.eval()
    x = torch.rand(5, 6, 3, dtype=torch.float64)
    torch.manual_seed(2)
    out = model(x)
    torch.manual_seed(2)
    expected, _ = reference(model, x, 0.5 * torch.randn(5, HIDDEN, dtype=torch.float64))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    noiseless, _ = reference(model, x, torch.zeros(5, HIDDEN, dtype=torch.float64))
    assert (out - noiseless).abs().max() > 1e-3


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


def backward_gradient_elements(model: BNLSTM, inputs: Tensor) -> int:
    """Elements of all gradients one backward computes: the outputs of every autograd node."""
    total = 0

    def count(grad_inputs: tuple[Tensor | None, ...], _: object) -> None:
        nonlocal total
        total += sum(grad.numel() for grad in grad_inputs if grad is not None)

    out = model(inputs)
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        node.register_hook(count)
        stack.extend(child for child, _ in node.next_functions)
    out.sum().backward()
    return total


@pytest.mark.parametrize(("bn", "options", "language_model"), [
    ("all", {}, False), ("input", {}, False), ("none", {}, False),
    ("all", {"shared_statistics": True}, False), ("input", {}, True)])
def test_backward_cost_is_linear_in_steps(bn: str, options: dict, language_model: bool) -> None:
    """Twice the steps, twice the gradient elements (indexing one step of the input term per
    step back-propagated a whole (B, T, 4H) gradient each: a ratio near 4 here)."""
    if language_model:
        spec = DataSpec("chars", (400,), 3, "language_model")
        batch = [torch.randint(0, 3, (4, steps)) for steps in (200, 400)]
    else:
        spec = DataSpec("toy", (400, 3), 4)
        batch = [torch.rand(4, steps, 3) for steps in (200, 400)]
    model = BNLSTM(spec, hidden_size=2, bn=bn, **options)
    short, long = (backward_gradient_elements(model, inputs) for inputs in batch)
    assert long / short == pytest.approx(2.0, abs=0.05)


def test_bad_config_values() -> None:
    with pytest.raises(ValueError, match="model.bn='layer' is invalid: expected one of all"):
        OmegaConf.to_object(compose("model=bnlstm", "model.bn=layer"))
    with pytest.raises(ValueError, match="hidden_size=0"):
        BNLSTM(DataSpec("seq", (28, 28), 10), hidden_size=0)
    with pytest.raises(Exception, match="needs sequence or tokens data"):
        BNLSTM(DataSpec("img", (1, 28, 28), 10))
    for key, value, expected in [("population_stats", "dataset", "expected one of moving_average"),
                                 ("h0_noise", "never", "expected one of train, always")]:
        with pytest.raises(ValueError, match=f"model.{key}='{value}' is invalid: {expected}"):
            OmegaConf.to_object(compose("model=bnlstm", f"model.{key}={value}"))
    with pytest.raises(ValueError, match="cell_shift=True is invalid: expected false with bn=all"):
        BNLSTM(SPEC, bn="all", cell_shift=True)
    with pytest.raises(ValueError, match="population_examples=0 is invalid"):
        BNLSTM(SPEC, population_examples=0)


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
