"""Research instruments (ngexp/instruments, ngexp/curvature/per_example.py) against brute force:
tangent kernels against stacked per-example Jacobians, per-example gradients against one
backward per example, dead filters against a direct forward pass, CKA and B_simple against
hand computations."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from ngexp.curvature import per_example
from ngexp.curvature.capture import Capture
from ngexp.curvature.per_example import example_gradients, noise_scale_terms
from ngexp.curvature.tasks import Classification
from ngexp.data.bundle import Split
from ngexp.data.spec import DataSpec
from ngexp.instruments.filters import (
    conv_norm_pairs,
    dead_filter_masks,
    filter_metrics,
    filter_sparsity,
)
from ngexp.instruments.gradients import GradientProbe, gradient_metrics, measure_example_gradients
from ngexp.instruments.tangent import (
    centered_alignment,
    kernel_metrics,
    probe_indices,
    probe_set,
    spectrum_statistics,
    tangent_alignment,
    tangent_kernels,
)
from ngexp.prune.report import output_positions, sparsity_report

REPO = Path(__file__).resolve().parents[1]
CLASSIFY = Classification()


# ---------------------------------------------------------------------------- tangent kernels
def small_cnn() -> nn.Module:
    """Conv -> BN -> ReLU -> pool -> Linear -> ReLU -> Linear, float64, BN with non-trivial
    running statistics (eval mode must use them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 5), nn.ReLU(),
                          nn.Linear(5, 4)).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.2, 0.2)
    return model


def stacked_jacobians(model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
    """``{param: (n, C, P_p)}`` from ``jacrev`` on one example at a time, in eval mode."""
    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    rows = []
    for x in inputs:
        jac = jacrev(lambda p, x=x: functional_call(model, (p, buffers), (x[None],))[0])(params)
        rows.append({name: j.flatten(1) for name, j in jac.items()})
    model.train()
    return {name: torch.stack([row[name] for row in rows]) for name in params}


@pytest.mark.parametrize("max_elements", [2**28, 1500])  # one block; blocks of 34 entries
@pytest.mark.parametrize("per_output", [False, True])
def test_tangent_kernels_equal_stacked_per_example_jacobians(max_elements: int,
                                                             per_output: bool) -> None:
    model = small_cnn()
    inputs = torch.randn(11, 2, 4, 4, dtype=torch.float64)
    jac = stacked_jacobians(model, inputs)
    equation = "icp,jcp->cij" if per_output else "icp,jcp->ij"
    blocks = {name: torch.einsum(equation, j, j) for name, j in jac.items()}
    kernels = tangent_kernels(model, inputs, per_output=per_output, chunk_size=3,
                              max_elements=max_elements)
    assert model.training  # mode restored
    torch.testing.assert_close(kernels.total, sum(blocks.values()))
    assert list(kernels.layers) == ["0", "5", "7"]  # BatchNorm is in the total only
    for layer, kernel in kernels.layers.items():
        torch.testing.assert_close(kernel, blocks[f"{layer}.weight"] + blocks[f"{layer}.bias"])
    assert float((kernels.total - sum(kernels.layers.values())).abs().max()) > 1e-6


def test_cka_by_hand() -> None:
    """CKA(I, Y Y^T) for labels (0, 0, 1): H Y Y^T H = [[2, 2, -4], [2, 2, -4], [-4, -4, 8]] / 9,
    <H, Lc> = tr(Lc) = 4/3, |H| = sqrt(2), |Lc| = 4/3, so CKA = 1 / sqrt(2)."""
    labels = torch.nn.functional.one_hot(torch.tensor([0, 0, 1]))
    target = (labels @ labels.T).double()
    torch.testing.assert_close(centered_alignment(torch.eye(3), target),
                               torch.tensor(1 / math.sqrt(2), dtype=torch.float64))
    torch.testing.assert_close(centered_alignment(3 * target, target),
                               torch.tensor(1.0, dtype=torch.float64))
    torch.manual_seed(0)  # against tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))
    features, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 3, (7,))
    kernel, onehot = features @ features.T, torch.nn.functional.one_hot(y, 3).double()
    h = torch.eye(7, dtype=torch.float64) - 1 / 7
    label_kernel = onehot @ onehot.T
    expected = torch.trace(kernel @ h @ label_kernel @ h) / torch.sqrt(
        torch.trace(kernel @ h @ kernel @ h) * torch.trace(label_kernel @ h @ label_kernel @ h))
    torch.testing.assert_close(kernel_metrics(kernel, onehot)["cka"], expected)


def test_spectrum_statistics_of_known_eigenvalues() -> None:
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    kernel = q @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ q.T
    stats = spectrum_statistics(kernel, top_k=2)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    torch.testing.assert_close(stats["effective_rank"], torch.exp(-(p * p.log()).sum()))
    torch.testing.assert_close(float(stats["participation_ratio"]), 100 / 30)
    torch.testing.assert_close(float(stats["top2_mass"]), 0.7)


def test_tangent_alignment_reports_total_layer_and_output_metrics() -> None:
    model = small_cnn()
    probe = Split(torch.randn(8, 2, 4, 4, dtype=torch.float64), torch.arange(8) % 4)
    values = tangent_alignment(model, probe, top_k=3, per_output=True)
    kernels = tangent_kernels(model, probe.inputs, per_output=True)
    labels = torch.nn.functional.one_hot(probe.targets, 4)
    expected = kernel_metrics(kernels.total.sum(0), labels, 3)
    for key in ("cka", "effective_rank", "participation_ratio", "top3_mass"):
        assert values[f"tangent/{key}"] == pytest.approx(float(expected[key]))
    layer = kernel_metrics(kernels.layers["5"].sum(0), labels, 3)["cka"]
    assert values["tangent/5/cka"] == pytest.approx(float(layer))
    out2 = kernel_metrics(kernels.total[2], labels[:, 2:3], 3)["cka"]
    assert values["tangent/out2/cka"] == pytest.approx(float(out2))


def test_probe_set_is_stratified_and_deterministic() -> None:
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate([50, 3, 40, 40])])
    targets = targets[torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))]
    index = probe_indices(targets, 20, seed=1)
    counts = torch.bincount(targets[index], minlength=4).tolist()
    assert sum(counts) == 20 and counts[1] == 3  # the small class gives all it has
    assert sorted(counts[i] for i in (0, 2, 3)) in ([5, 6, 6], [5, 5, 7]) and max(counts) == 6
    assert len(set(index.tolist())) == 20
    assert targets[index].tolist() == sorted(targets[index].tolist())  # ordered by class
    assert torch.equal(index, probe_indices(targets, 20, seed=1))
    assert not torch.equal(index, probe_indices(targets, 20, seed=2))
    balanced = torch.arange(1000) % 10
    split = Split(torch.randn(1000, 3), balanced)
    probe = probe_set(split, 256, seed=0)
    assert sorted(torch.bincount(probe.targets).tolist()) == [25] * 4 + [26] * 6
    picked = probe_indices(balanced, 256, seed=0)
    torch.testing.assert_close(probe.inputs, split.inputs[picked])
    assert probe_indices(balanced, 1000).tolist() == torch.argsort(balanced, stable=True).tolist()


# ---------------------------------------------------------------------------- per-example
class TwiceLinear(nn.Module):
    """One Linear applied twice per forward, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class TwiceConv(nn.Module):
    """One grouped, strided, padded Conv2d applied twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.out = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.conv(torch.relu(self.conv(x)))).flatten(1))


def case_linear() -> tuple[nn.Module, Tensor]:
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), torch.randn(6, 5)


def case_sequence() -> tuple[nn.Module, Tensor]:
    return (nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)),
            torch.randn(6, 4, 6))


def case_conv() -> tuple[nn.Module, Tensor]:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=2, dilation=2, groups=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3)), torch.randn(6, 3, 8, 8)


def case_twice_linear() -> tuple[nn.Module, Tensor]:
    return TwiceLinear(), torch.randn(6, 4)


def case_twice_conv() -> tuple[nn.Module, Tensor]:
    return TwiceConv(), torch.randn(6, 4, 8, 8)


def looped_example_gradients(model: nn.Module, inputs: Tensor, targets: Tensor,
                             layers: list[str]) -> Tensor:
    """``(B, P)`` per-example gradients of the layers' weight and bias, one backward each."""
    modules = dict(model.named_modules())
    params = [p for name in layers for p in modules[name].parameters(recurse=False)]
    rows = []
    for x, y in zip(inputs, targets, strict=True):
        grads = torch.autograd.grad(CLASSIFY.loss(model(x[None]), y[None]), params)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def layer_slices(model: nn.Module, layers: list[str]) -> list[slice]:
    modules, slices, begin = dict(model.named_modules()), [], 0
    for name in layers:
        size = sum(p.numel() for p in modules[name].parameters(recurse=False))
        slices.append(slice(begin, begin + size))
        begin += size
    return slices


@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("case", [case_linear, case_sequence, case_conv, case_twice_linear,
                                  case_twice_conv])
def test_per_example_norms_equal_a_loop_over_examples(case, gram: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Both norm formulas (Gram trick, explicit per-example matrices), one example per chunk."""
    monkeypatch.setattr(per_example, "gram_is_cheaper", lambda *_: gram)
    monkeypatch.setattr(per_example, "CHUNK_ELEMENTS", 1)
    torch.manual_seed(0)
    model, inputs = case()
    targets = torch.randint(0, 3, (len(inputs),))
    grads = measure_example_gradients(model, CLASSIFY, inputs, targets)
    reference = looped_example_gradients(model, inputs, targets, grads.names)
    for index, part in enumerate(layer_slices(model, grads.names)):
        torch.testing.assert_close(grads.sq_norms[index], reference[:, part].square().sum(1),
                                   rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(grads.mean_sq_norms[index],
                                   reference[:, part].mean(0).square().sum(), rtol=1e-4, atol=1e-8)
    total, mean = grads.total()
    torch.testing.assert_close(total, reference.square().sum(1), rtol=1e-4, atol=1e-7)
    # the batch-mean gradient is the gradient of the batch loss
    batch_grad = torch.autograd.grad(CLASSIFY.loss(model(inputs), targets),
                                     [p for p in model.parameters()])
    torch.testing.assert_close(mean, sum(g.square().sum() for g in batch_grad), rtol=1e-4,
                               atol=1e-8)


def test_noise_scale_terms_equal_their_definition_and_the_two_batch_estimator() -> None:
    torch.manual_seed(0)
    example_grads = torch.randn(5, 7, dtype=torch.float64) + 0.5  # B = 5 known gradients
    mean = example_grads.mean(0)
    trace, grad_sq = noise_scale_terms(example_grads.square().sum(1), mean.square().sum())
    expected_trace = (example_grads - mean).square().sum() / 4
    torch.testing.assert_close(trace, expected_trace)
    torch.testing.assert_close(grad_sq, mean.square().sum() - expected_trace / 5)
    # McCandlish et al. App. A with B_small = 1, B_big = 5
    small, big = example_grads.square().sum(1).mean(), mean.square().sum()
    torch.testing.assert_close(grad_sq, (5 * big - small) / 4)
    torch.testing.assert_close(trace, (small - big) / (1 - 1 / 5))


def test_noise_scale_terms_are_unbiased() -> None:
    """Gradients mu + sigma * noise in d = 6 dims: E[S] = 6 sigma^2, E[|G|^2] = |mu|^2, while
    the plain |mean|^2 is biased upward by tr(Sigma) / B."""
    generator = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5, -1.0], dtype=torch.float64)
    grads = mu + 0.8 * torch.randn(20000, 4, 6, generator=generator, dtype=torch.float64)
    trace, grad_sq = noise_scale_terms(grads.square().sum(-1), grads.mean(1).square().sum(-1))
    assert float(trace.mean()) == pytest.approx(6 * 0.64, rel=0.02)
    assert float(grad_sq.mean()) == pytest.approx(float(mu.square().sum()), rel=0.01)
    assert float(grads.mean(1).square().sum(-1).mean()) == pytest.approx(
        float(mu.square().sum()) + 6 * 0.64 / 4, rel=0.01)


def test_gradient_metrics_equal_the_definitions_on_looped_gradients() -> None:
    torch.manual_seed(0)
    model, inputs = case_conv()
    targets = torch.randint(0, 3, (len(inputs),))
    grads = measure_example_gradients(model, CLASSIFY, inputs, targets)
    reference = looped_example_gradients(model, inputs, targets, grads.names).double()
    values = gradient_metrics(grads)
    norms = reference.norm(dim=1)
    for q in (0.1, 0.5, 0.9):
        assert values[f"grad/norm_q{round(100 * q):02d}"] == pytest.approx(
            float(torch.quantile(norms, q)), rel=1e-4)
    assert values["grad/norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-4)
    mean = reference.mean(0)
    trace = float((reference - mean).square().sum() / (len(reference) - 1))
    grad_sq = float(mean.square().sum()) - trace / len(reference)
    assert values["grad/trace_sigma"] == pytest.approx(trace, rel=1e-4)
    assert values["grad/grad_sq"] == pytest.approx(grad_sq, rel=1e-3)
    assert values["grad/b_simple"] == pytest.approx(trace / grad_sq, rel=1e-3)
    first = reference[:, layer_slices(model, grads.names)[0]]
    assert values["grad/0/norm_q50"] == pytest.approx(float(first.norm(dim=1).quantile(0.5)),
                                                      rel=1e-4)


def test_gradient_probe_reads_the_training_step_and_disarms() -> None:
    torch.manual_seed(0)
    model, inputs = case_conv()
    targets = torch.randint(0, 3, (len(inputs),))
    expected = measure_example_gradients(model, CLASSIFY, inputs, targets)
    probe = GradientProbe(model)
    probe.arm()
    CLASSIFY.loss(model(inputs), targets).backward()
    grads = probe.read()
    torch.testing.assert_close(grads.sq_norms, expected.sq_norms)
    assert not probe.capture.active and not probe.capture.captured_inputs
    model(inputs)  # disarmed: nothing stored
    assert not probe.capture.captured_inputs
    with pytest.raises(ValueError, match="training backward"):
        example_gradients(probe.capture)
    probe.remove()


def test_uncovered_parameters_are_excluded_and_counted() -> None:
    """Per-example norms cover the capture's layer kinds, BatchNorm's scale and shift included
    (exact in eval mode); a PReLU slope (4) is in no norm and is reported as excluded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].weight.normal_()
    inputs, targets = torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))
    grads = measure_example_gradients(model, CLASSIFY, inputs, targets)
    assert grads.names == ["0", "1", "4"] and grads.excluded_params == 4
    assert gradient_metrics(grads)["grad/excluded_params"] == 4
    reference = looped_example_gradients(model, inputs, targets, grads.names)
    torch.testing.assert_close(grads.total()[0], reference.square().sum(1), rtol=1e-4, atol=1e-7)


def test_example_gradients_scale_for_a_summed_loss() -> None:
    torch.manual_seed(0)
    model, inputs = case_linear()
    targets = torch.randint(0, 3, (len(inputs),))
    capture = Capture(model, training_only=False)
    capture.active = True
    outputs = model(inputs)
    loss = torch.nn.functional.cross_entropy(outputs, targets, reduction="sum")
    torch.autograd.grad(loss, capture.layer_outputs())
    grads = example_gradients(capture, scale=1.0)
    capture.remove()
    reference = looped_example_gradients(model, inputs, targets, grads.names)
    torch.testing.assert_close(grads.total()[0], reference.square().sum(1), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- filters
def conv_net() -> nn.Sequential:
    """conv-BN-ReLU, conv-ReLU (no BN), pool, conv-BN-ReLU, classifier; with planted dead
    filters: small gamma (scale), very negative beta or bias (activation)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    with torch.no_grad():
        model[1].weight[[1, 4]] = torch.tensor([5e-4, -2e-4])  # scale-dead
        model[1].bias[2] = -100.0  # activation-dead
        model[3].bias.copy_(torch.tensor([-100.0, 1.0, 1.0, -100.0, 1.0]))  # 0, 3 dead (no BN)
        model[7].weight[0] = 1e-5  # scale-dead
        model[7].bias.copy_(torch.tensor([-50.0, -50.0, 1.0, 1.0]))  # 0 both ways, 1 activation
    model[1].running_var.fill_(2.0)
    return model


def test_dead_filters_equal_a_direct_forward_pass() -> None:
    model = conv_net()
    inputs = torch.rand(10, 3, 8, 8)
    assert conv_norm_pairs(model, inputs[:1]) == {"0": "1", "6": "7"}
    states = filter_sparsity(model, inputs, batch_size=4)
    assert [s.conv for s in states] == ["0", "3", "6"]
    model.eval()
    with torch.no_grad():
        for state, relu in zip(states, (2, 4, 8), strict=True):
            activation = model[:relu + 1](inputs)  # post-ReLU (n, filters, H, W)
            assert torch.equal(state.activation_dead, activation.amax((0, 2, 3)) == 0)
    model.train()
    assert states[0].activation_dead.nonzero().flatten().tolist() == [2]
    assert states[0].scale_dead.nonzero().flatten().tolist() == [1, 4]
    assert states[1].scale_dead is None and states[1].activation_dead.nonzero().flatten().tolist() \
        == [0, 3]
    assert states[2].dead("scale").tolist() == [True, False, False, False]
    assert states[2].dead("either").tolist() == [True, True, False, False]
    strict = filter_sparsity(model, inputs, scale_threshold=3e-4)
    assert strict[0].scale_dead.nonzero().flatten().tolist() == [4]


def test_dead_filter_flops_and_masks_agree_with_the_sparsity_report() -> None:
    model = conv_net()
    inputs = torch.rand(10, 3, 8, 8)
    states = filter_sparsity(model, inputs)
    metrics = filter_metrics(model, inputs, states)
    assert metrics["filters/0/either"] == pytest.approx(3 / 6)
    assert metrics["filters/scale"] == pytest.approx(3 / 10)  # of the 10 filters with a BN
    assert metrics["filters/either"] == pytest.approx(7 / 15)
    # by hand: 2 * filter weights * output positions
    expected = 3 * 2 * 27 * 64 + 2 * 2 * 54 * 64 + 2 * 2 * 45 * 4
    assert metrics["filters/dead_flops"] == expected
    masks = dead_filter_masks(model, states)
    report = sparsity_report(model, masks, output_positions(model, inputs[:1]))
    assert report["prune/flops_dense"] - report["prune/flops"] == expected
    assert metrics["filters/dead_flops_fraction"] == pytest.approx(
        expected / report["prune/flops_dense"])
    assert report["prune/channel_sparsity"] == pytest.approx(7 / 18)  # 3 Linear outputs kept


def test_masking_scale_dead_filters_nearly_keeps_the_function() -> None:
    model = conv_net()
    with torch.no_grad():
        model[1].bias[2] = 0.1  # only the scale-dead filters remain in the first layer
    inputs = torch.rand(10, 3, 8, 8)
    model.eval()
    states = filter_sparsity(model, inputs)
    masks = dead_filter_masks(model, states, criterion="scale")
    with torch.no_grad():
        before = model(inputs)
        masks.mask_weights()
        after = model(inputs)
    assert float(model[0].weight.detach()[[1, 4]].abs().sum()) == 0
    assert int((model[0].weight != 0).any((1, 2, 3)).sum()) == 4
    assert float((after - before).abs().max()) < 1e-2 * float(before.abs().max())


def test_pairs_in_vgg_bn_and_resnet() -> None:
    from ngexp.models.resnet import cifar_resnet
    from ngexp.models.vgg import VGG

    spec = DataSpec("tiny", (3, 32, 32), 10)
    vgg = VGG(spec, depth=11, batch_norm=True)
    convs = [name for name, m in vgg.named_modules() if isinstance(m, nn.Conv2d)]
    pairs = conv_norm_pairs(vgg, torch.rand(1, 3, 32, 32))
    assert pairs == {name: f"features.{int(name.split('.')[1]) + 1}" for name in convs}
    resnet = cifar_resnet(spec, depth=8)
    pairs = conv_norm_pairs(resnet, torch.rand(1, 3, 32, 32))
    expected = {"stem.0": "stem.1"}
    for block in range(3):
        expected |= {f"stages.{block}.conv1": f"stages.{block}.bn1",
                     f"stages.{block}.conv2": f"stages.{block}.bn2"}
    assert pairs == expected


# ---------------------------------------------------------------------------- layering
def test_instruments_import_nothing_from_train_optim_or_cli() -> None:
    files = sorted((REPO / "ngexp" / "instruments").glob("*.py"))
    files.append(REPO / "ngexp" / "curvature" / "per_example.py")
    for path in files:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        forbidden = ("ngexp.train", "ngexp.optim", "ngexp.cli")
        if path.parent.name == "curvature":
            forbidden += ("ngexp.prune", "ngexp.instruments")
        assert not {m for m in imported if m.startswith(forbidden)}, path.name
