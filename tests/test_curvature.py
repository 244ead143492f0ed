"""The curvature core (ngexp/curvature): the layer-I/O capture and the Kronecker estimators,
against exact Fisher blocks, curvlinops and hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import Tensor, nn

from ngexp.curvature import layers as layers_module
from ngexp.curvature.capture import (
    SAMPLED,
    TRAINING,
    Capture,
    LayerIO,
    backward_sampled,
    layer_io,
)
from ngexp.curvature.kronecker import (
    PassGroup,
    eigenbasis_moments,
    input_moment,
    kronecker_diagonal,
    kronecker_factors,
)
from ngexp.curvature.tasks import Classification, Reconstruction
from tests.curvature_reference import (
    capture_factors,
    captured,
    empirical_fisher_block,
    per_example_matrices,
)
from tests.helpers import sum_tolerance

CLASSIFY = Classification()


def relative_error(ours: Tensor, reference: Tensor) -> float:
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


# ---------------------------------------------------------------------------- exactness
def test_batch_size_one_linear_equals_exact_fisher() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(1, 5), torch.tensor([2])
    (a, g), = capture_factors(model, CLASSIFY, x, y).values()
    layer = LayerIO("", model)
    exact = empirical_fisher_block(per_example_matrices(model, CLASSIFY, x, y, layer, "")[:, 0])
    torch.testing.assert_close(torch.kron(g[0], a[0]).double(), exact, rtol=1e-5, atol=1e-7)


CONV_CASES = [
    dict(stride=1, padding=0),
    dict(stride=2, padding=1),
    dict(stride=(2, 1), padding=(1, 2), dilation=2),
    dict(padding="same", dilation=(1, 2)),
    dict(padding="valid", bias=False),
    dict(padding=1, groups=2),
    dict(padding=1, groups=4, bias=False),
    dict(padding=1, padding_mode="reflect"),
    dict(padding=(2, 1), padding_mode="circular", groups=2),
]


@pytest.mark.parametrize("options", CONV_CASES)
def test_conv_patches_reproduce_the_convolution(options: dict) -> None:
    """[W | b] applied to the unfolded rows gives the conv output: the patch layout, padding
    and group blocks agree with Conv2d's own."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, kernel_size=(3, 2), **options)
    layer = layer_io("conv", conv)
    x = torch.randn(2, 4, 9, 8)
    rows = layer.input_rows(x)
    matrix = layer.matrix(conv.weight, conv.bias)
    ours = torch.einsum("bpgi,goi->bpgo", rows, matrix)
    torch.testing.assert_close(ours, layer.grad_rows(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [(3, 2), (5, 5), (1, 1), (3, 3)])
@pytest.mark.parametrize("options", [*CONV_CASES, dict(stride=3), dict(stride=(1, 2))])
def test_conv_input_moment_equals_the_gram_matrix_of_the_patches(options: dict,
                                                                 kernel: tuple) -> None:
    """``input_moment`` of a convolution (from row segments where that is cheaper, else from
    the patches) is ``sum_rows [f; 1] [f; 1]^T`` of the unfolded patches, whatever the
    layout of the input (channels-last too). The moment is a float32 sum of ``count``
    products in an order the BLAS kernel picks: its error scales with the largest diagonal
    entry (the magnitude of the terms of every entry), not with the entry."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, kernel_size=kernel, **options)
    layer = layer_io("conv", conv)
    x = torch.randn(3, 4, 11, 10, dtype=torch.float64)
    rows = layer.input_rows(x).double()
    expected = torch.einsum("bpgi,bpgj->gij", rows, rows)
    count = rows.shape[0] * rows.shape[1]
    tolerance = sum_tolerance(torch.float32, count, expected.diagonal(0, 1, 2).max())
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):
        moment, rows_summed = input_moment(layer, layout, reduce=False)
        assert rows_summed == count and moment.dtype == torch.float32
        torch.testing.assert_close(moment.double(), expected, rtol=0, atol=tolerance)


# ---------------------------------------------------------------------------- curvlinops
class SplitConv(nn.Module):
    """A grouped convolution as one ungrouped Conv2d per group: curvlinops' factors of part
    ``i`` are the ``i``-th group factors of the grouped layer."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.width = conv.in_channels // conv.groups
        out = conv.out_channels // conv.groups
        self.parts = nn.ModuleList()
        for i in range(conv.groups):
            part = nn.Conv2d(self.width, out, conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation, bias=conv.bias is not None)
            part.weight.data.copy_(conv.weight.data[i * out:(i + 1) * out])
            if conv.bias is not None:
                part.bias.data.copy_(conv.bias.data[i * out:(i + 1) * out])
            self.parts.append(part)

    def forward(self, x: Tensor) -> Tensor:
        chunks = x.split(self.width, dim=1)
        parts = [part(chunk) for part, chunk in zip(self.parts, chunks, strict=True)]
        return torch.cat(parts, dim=1)


def mlp() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """Linear on (B, T, D) inputs (weight sharing over T), then a classifier."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Flatten(), nn.Linear(20, 4))
    return model, model, torch.randn(8, 4, 6), torch.randint(0, 4, (8,))


def cnn() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """Strided+padded conv, then a dilated grouped conv, then a classifier."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
    )
    reference = nn.Sequential(*[SplitConv(m) if isinstance(m, nn.Conv2d) and m.groups > 1 else m
                                for m in model])
    x = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(reference(x), model(x))
    return model, reference, x, torch.randint(0, 5, (6,))


def reference_factors(reference: nn.Module, x: Tensor, y: Tensor, loss: nn.Module,
                      fisher_type: str, kfac_approx: str) -> dict[str, tuple[Tensor, Tensor]]:
    op = KFACLinearOperator(reference, loss, list(reference.parameters()), [(x, y)],
                            fisher_type=fisher_type, kfac_approx=kfac_approx,
                            separate_weight_and_bias=False, check_deterministic=False)
    op.compute_kronecker_factors()
    state = op.state_dict()
    return {name: (state["input_covariances"][name], state["gradient_covariances"][name])
            for name in state["input_covariances"]}


def grouped(reference: dict[str, tuple[Tensor, Tensor]], name: str) -> tuple[Tensor, Tensor]:
    """Stack per-group reference factors ``name.parts.i`` (or the single ``name``)."""
    names = [key for key in reference if key == name or key.startswith(f"{name}.parts.")]
    return (torch.stack([reference[key][0] for key in names]),
            torch.stack([reference[key][1] for key in names]))


@pytest.mark.parametrize("network", [mlp, cnn])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_empirical_factors_match_curvlinops(network, kfac_approx: str) -> None:
    model, reference, x, y = network()
    ours = capture_factors(model, CLASSIFY, x, y, "empirical", kfac_approx)
    theirs = reference_factors(reference, x, y, nn.CrossEntropyLoss(), "empirical", kfac_approx)
    for name, (a, g) in ours.items():
        ref_a, ref_g = grouped(theirs, name)
        torch.testing.assert_close(a, ref_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("network", [mlp, cnn])
def test_mc_factors_match_curvlinops_in_expectation(network) -> None:
    """MC targets, many samples: G approaches the exact expectation (curvlinops' type-2)."""
    model, reference, x, y = network()
    copies = 100  # the batch repeated: 400 samples per example in 4 passes
    ours = capture_factors(model, CLASSIFY, x.repeat(copies, *[1] * (x.dim() - 1)),
                           y.repeat(copies), "mc", mc_samples=4)
    theirs = reference_factors(reference, x, y, nn.CrossEntropyLoss(), "type-2", "expand")
    capture = captured(model, CLASSIFY, x, y)  # the rows of one copy of the batch
    rows = {layer.name: sum(math.prod(layer.input_rows(inp).shape[:2]) for inp in layer.inputs)
            for layer in capture.layers}
    capture.remove()
    for name, (a, g) in ours.items():
        ref_a, ref_g = grouped(theirs, name)
        # both are float32 means of rows: ours of ``copies`` repeats of the batch (correlated
        # rounding errors: the worst case), curvlinops' of one; the terms' magnitude is the
        # largest diagonal entry
        scale = float(ref_a.diagonal(0, 1, 2).max())
        n = copies * rows[name]
        tolerance = (sum_tolerance(torch.float32, n, n * scale, independent=False) / n
                     + sum_tolerance(torch.float32, rows[name], rows[name] * scale) / rows[name])
        torch.testing.assert_close(a, ref_a, rtol=0, atol=tolerance)
        assert relative_error(g, ref_g) < 0.1, name


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_bernoulli_autoencoder_factors_match_curvlinops(fisher_type: str) -> None:
    """Reconstruction loss = BCE summed over outputs / B, i.e. curvlinops' sum reduction / B."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 4), nn.Sigmoid(), nn.Linear(4, 10))
    x = torch.rand(16, 10).round()  # binary: curvlinops' type-2 BCE needs 0/1 targets
    task = Reconstruction()
    copies = 1 if fisher_type == "empirical" else 100  # MC: 400 samples per example
    ours = capture_factors(model, task, x.repeat(copies, 1), x.repeat(copies, 1), fisher_type,
                           mc_samples=1 if fisher_type == "empirical" else 4)
    theirs = reference_factors(model, x, x, nn.BCEWithLogitsLoss(reduction="sum"),
                               "empirical" if fisher_type == "empirical" else "type-2", "expand")
    for name, (a, g) in ours.items():
        ref_a, ref_g = theirs[name]
        torch.testing.assert_close(a[0], ref_a, rtol=1e-4, atol=1e-6)
        if fisher_type == "empirical":
            torch.testing.assert_close(g[0], ref_g / len(x), rtol=1e-4, atol=1e-7)
        else:
            assert relative_error(g[0], ref_g / len(x)) < 0.1, name


# ---------------------------------------------------------------------------- repeated calls
class TinyRNN(nn.Module):
    """``h_t = tanh(W_x x_t + W_h h_{t-1})``: W_x applied per step or once on ``(B, T, D)``."""

    def __init__(self, per_step_input: bool) -> None:
        super().__init__()
        self.w_x, self.w_h, self.out = nn.Linear(3, 4), nn.Linear(4, 4, bias=False), nn.Linear(4, 2)
        self.per_step_input = per_step_input
        self.record = False  # keep the states and preactivation gradients (not under torch.func)
        self.states: list[Tensor] = []
        self.preactivations: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        projected = None if self.per_step_input else self.w_x(x)
        h = x.new_zeros(x.shape[0], 4)
        self.states, self.preactivations = [], []
        for t in range(x.shape[1]):
            inp = self.w_x(x[:, t]) if self.per_step_input else projected[:, t]
            pre = inp + self.w_h(h)
            if self.record:
                pre.retain_grad()
                self.states.append(h)
                self.preactivations.append(pre)
            h = torch.tanh(pre)
        return self.out(h)


def rnn_pair() -> tuple[TinyRNN, TinyRNN, Tensor, Tensor]:
    torch.manual_seed(4)
    per_step = TinyRNN(per_step_input=True)
    once = TinyRNN(per_step_input=False)
    once.load_state_dict(per_step.state_dict())
    return per_step, once, torch.randn(5, 6, 3), torch.randint(0, 2, (5,))


def test_repeated_calls_sum_statistics_over_time() -> None:
    per_step, once, x, y = rnn_pair()
    ours = capture_factors(per_step, CLASSIFY, x, y)
    same = capture_factors(once, CLASSIFY, x, y)
    for name in ("w_x", "w_h", "out"):  # T calls on (B, D) == one call on (B, T, D)
        for mine, theirs in zip(ours[name], same[name], strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    # by hand: A = mean over (example, step) of h h^T; G = (1/N) sum over (example, step) of g g^T
    per_step.record = True
    CLASSIFY.loss(per_step(x), y).backward()
    states = torch.cat(per_step.states)
    scaled = torch.cat([pre.grad for pre in per_step.preactivations]) * len(x)
    torch.testing.assert_close(ours["w_h"][0][0], states.T @ states / len(states))
    torch.testing.assert_close(ours["w_h"][1][0], scaled.T @ scaled / len(x))


def test_repeated_calls_pair_each_input_with_its_gradient() -> None:
    """EKFAC's per-example gradients (identity basis: s = mean of squared per-example
    gradients) of modules called once per time step equal torch.func's."""
    per_step, _, x, y = rnn_pair()
    capture = captured(per_step, CLASSIFY, x, y)
    for layer in capture.layers:
        eye_a = torch.eye(layer.in_dim).expand(1, -1, -1)
        eye_g = torch.eye(layer.out_dim).expand(1, -1, -1)
        scale = eigenbasis_moments(layer, [PassGroup(-1, capture.passes(TRAINING), len(x))],
                                       eye_a, eye_g, len(x))
        exact = per_example_matrices(per_step, CLASSIFY, x, y, layer, f"{layer.name}.")
        torch.testing.assert_close(scale, exact.square().mean(0), rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------------------- hooks
def test_hooks_idle_when_inactive_or_in_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, x, y = cnn()
    capture = Capture(model)
    unfolds = []
    monkeypatch.setattr(layers_module.F, "unfold", lambda *a, **k: unfolds.append(1))
    model(x)
    assert not capture.captured_inputs
    capture.active = True
    model.eval()
    model(x)
    assert not capture.captured_inputs
    with torch.no_grad():
        model.train()(x)
    assert not capture.captured_inputs and not unfolds
    with capture.ignoring():  # gradients not kept
        CLASSIFY.loss(model(x), y).backward()
    assert capture.captured_inputs and not capture.pass_kinds
    CLASSIFY.loss(model(x), y).backward()  # the plain backward is a training pass
    assert capture.pass_kinds == [TRAINING] and capture.captured(TRAINING)
    assert all(set(layer.grads[0]) == {0} for layer in capture.layers)
    model(x)  # a new forward drops the previous one
    assert all(len(layer.inputs) == 1 for layer in capture.layers)
    capture.remove()
    model(x)
    assert not capture.captured_inputs


# ---------------------------------------------------------------------------- diagonals
def test_kronecker_diagonal_kfac_averages_factors_over_batches() -> None:
    model, _, x, y = cnn()
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    diagonals = kronecker_diagonal(model, CLASSIFY, iter(batches), "empirical", "kfac")
    assert all(p.grad is None for p in model.parameters())
    per_batch = [capture_factors(model, CLASSIFY, *batch) for batch in batches]
    capture = Capture(model)
    assert set(diagonals) == {f"{layer.name}.weight" for layer in capture.layers}
    for layer in capture.layers:
        a = sum(factors[layer.name][0] for factors in per_batch) / 2
        g = sum(factors[layer.name][1] for factors in per_batch) / 2
        dense = torch.stack([torch.kron(g[i], a[i]).diagonal() for i in range(layer.groups)])
        expected = layer.split(dense.view(layer.groups, layer.out_dim, layer.in_dim))[0]
        torch.testing.assert_close(diagonals[layer.weight_name], expected, rtol=1e-5, atol=1e-9)
        assert diagonals[layer.weight_name].shape == layer.module.weight.shape


def test_kronecker_diagonal_ekfac_is_diagonal_of_eigenvalue_corrected_matrix() -> None:
    model, _, x, y = mlp()
    diagonals = kronecker_diagonal(model, CLASSIFY, [(x, y)], "empirical", "ekfac")
    factors = capture_factors(model, CLASSIFY, x, y)
    for layer in Capture(model).layers:
        a, g = factors[layer.name]
        basis = torch.kron(torch.linalg.eigh(g[0].double())[1], torch.linalg.eigh(a[0].double())[1])
        exact = empirical_fisher_block(
            per_example_matrices(model, CLASSIFY, x, y, layer, f"{layer.name}.")[:, 0])
        scale = (basis.T @ exact @ basis).diagonal()  # EKFAC's s in that basis
        dense = (basis * scale) @ basis.T
        expected = layer.split(dense.diagonal().view(1, layer.out_dim, layer.in_dim).float())[0]
        torch.testing.assert_close(diagonals[layer.weight_name], expected, rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------------------- pass kinds
def test_passes_are_recorded_by_kind_and_sampled_passes_average() -> None:
    """Sampled passes (MC Fisher) and the training pass are told apart; G averages the passes
    it is given: two sampled passes give the mean of their single-pass factors."""
    model, _, x, y = mlp()
    capture = Capture(model)
    capture.active = True
    outputs = model(x)
    generator = torch.Generator().manual_seed(0)
    backward_sampled(capture, outputs, CLASSIFY, 2, generator, retain_last=True)
    CLASSIFY.loss(outputs, y).backward()
    assert capture.pass_kinds == [SAMPLED, SAMPLED, TRAINING]
    layer = capture.layers[0]
    def factors(passes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return kronecker_factors(layer, [PassGroup(-1, passes, len(x))], len(x))

    _, both = factors(capture.passes(SAMPLED))
    singles = [factors([index])[1] for index in (0, 1)]
    torch.testing.assert_close(both, (singles[0] + singles[1]) / 2)
    _, empirical = factors(capture.passes(TRAINING))
    torch.testing.assert_close(empirical, capture_factors(model, CLASSIFY, x, y)["0"][1])
    capture.remove()


def test_input_moment_adds_the_homogeneous_coordinate_exactly() -> None:
    """A from the features' Gram matrix plus sums equals the Gram matrix of rows with a 1."""
    model, _, x, y = cnn()
    capture = captured(model, CLASSIFY, x, y)
    for layer in capture.layers:
        rows = torch.cat([layer.input_rows(inp) for inp in layer.inputs], 1)
        flat = rows.flatten(0, 1).transpose(0, 1)
        expected = flat.mT @ flat / flat.shape[1]
        a, _ = kronecker_factors(layer, [PassGroup(-1, capture.passes(TRAINING), len(x))], len(x))
        torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
    capture.remove()
