"""The everyday training loops with a preconditioner: gradient accumulation, loss scaling
(GradScaler), and the coverage report (ngexp/curvature/capture.py, coverage.py,
ngexp/optim/preconditioner.py)."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngexp.curvature.kronecker import PassGroup, kronecker_factors
from ngexp.curvature.tasks import Classification
from ngexp.optim.ekfac import EKFAC
from ngexp.optim.kfac import KFAC
from ngexp.optim.natural_gradient import NaturalGradient

TASK = Classification()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2),
                         nn.Flatten(), nn.Linear(12, 3))


def batch(model: nn.Module, n: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (n, 6) if isinstance(model[0], nn.Linear) else (n, 2, 5, 5)
    x = torch.randn(*shape, generator=generator)
    return x, torch.randint(0, 3, (n,), generator=generator)


def one_step(model: nn.Module, kind: type, x: Tensor, y: Tensor, micro: int,
             **options) -> tuple[dict[str, dict[str, Tensor]] | None, list[Tensor]]:
    """The curvature and the preconditioned ``.grad`` after one step on ``(x, y)`` split into
    ``micro`` micro-batches (each loss scaled by its share of the batch)."""
    pre = kind(model, fisher_type="empirical", kl_clip=None, **options)
    model.zero_grad()
    for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
        (TASK.loss(model(xs), ys) * len(ys) / len(y)).backward()
    pre.step()
    grads = [p.grad.clone() for p in model.parameters()]
    curvature = pre.curvature() if isinstance(pre, (KFAC, EKFAC)) else None
    pre.remove()
    return curvature, grads


@pytest.mark.parametrize("micro", [2, 4])
@pytest.mark.parametrize("make", [mlp, cnn], ids=["linear", "conv2d"])
@pytest.mark.parametrize("kind", [KFAC, EKFAC, NaturalGradient], ids=["kfac", "ekfac", "ng"])
def test_accumulated_micro_batches_equal_the_concatenated_batch(make, kind, micro) -> None:
    """k backward passes before one step: the factors, the EKFAC scaling and the direction of
    the concatenated batch (the empirical Fisher: exact up to float rounding)."""
    model = make()
    x, y = batch(model)
    # CG run to convergence: a tolerance stop may fall one iteration apart by rounding
    options = {"cg_tol": 0.0, "cg_iters": 100} if kind is NaturalGradient else {}
    whole_curvature, whole = one_step(copy.deepcopy(model), kind, x, y, 1, **options)
    parts_curvature, parts = one_step(copy.deepcopy(model), kind, x, y, micro, **options)
    for a, b in zip(parts, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 if options else 1e-6)
    if whole_curvature is not None:
        assert parts_curvature is not None and set(parts_curvature) == set(whole_curvature)
        for name, state in whole_curvature.items():
            for key in ("A", "G", "s"):
                if key in state:
                    torch.testing.assert_close(parts_curvature[name][key], state[key],
                                               rtol=1e-4, atol=1e-6)


def test_accumulated_monte_carlo_factors_have_the_fisher_expectation() -> None:
    """MC Fisher with 2 micro-batches: the output layer's G has the expectation (1/N) sum_n
    (diag(p_n) - p_n p_n^T) of the concatenated batch (many samples, statistical bound)."""
    model = mlp()
    x, y = batch(model, n=16)
    pre = KFAC(model, fisher_type="mc", mc_samples=400, kl_clip=None)
    for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
        pre.backward(TASK.loss(model(xs), ys) / 2)
    pre.step()
    probs = torch.softmax(model(x), -1).detach()
    expected = (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]).mean(0)
    torch.testing.assert_close(pre.curvature()["2"]["G"][0], expected, rtol=0.15, atol=4e-3)
    pre.remove()


def test_zero_grad_before_a_forward_starts_the_statistics_over() -> None:
    """A forward and backward whose gradients ``zero_grad`` discarded do not count."""
    model = mlp()
    x, y = batch(model)
    pre = KFAC(model, fisher_type="empirical", kl_clip=None)
    TASK.loss(model(x[:8]), y[:8]).backward()
    model.zero_grad(set_to_none=True)
    TASK.loss(model(x), y).backward()
    pre.step()
    reference = KFAC(copy.deepcopy(model), fisher_type="empirical", kl_clip=None)
    TASK.loss(reference.model(x), y).backward()
    reference.step()
    for name, state in reference.curvature().items():
        torch.testing.assert_close(pre.curvature()[name]["A"], state["A"])
        torch.testing.assert_close(pre.curvature()[name]["G"], state["G"])


def train(kind: type, scale: float | None, steps: int = 3, **options) -> list[Tensor]:
    """Weights after ``steps`` SGD steps with a preconditioner, the loss scaled by a
    GradScaler with ``scale`` (None: no scaler)."""
    model = mlp()
    x, y = batch(model, n=64)
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    pre = kind(model, grad_scaler=scaler, cov_update_freq=1, inv_update_freq=1, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        xs, ys = x[16 * step:16 * (step + 1)], y[16 * step:16 * (step + 1)]
        opt.zero_grad()
        loss = TASK.loss(model(xs), ys)
        if scaler is None:
            pre.backward(loss)
            pre.step()
            opt.step()
        else:
            pre.backward(scaler.scale(loss))
            scaler.unscale_(opt)
            pre.step()
            scaler.step(opt)
            scaler.update()
    pre.remove()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
@pytest.mark.parametrize("kind", [KFAC, EKFAC], ids=["kfac", "ekfac"])
def test_loss_scale_1024_gives_the_unscaled_weights(kind, fisher_type) -> None:
    for scaled, plain in zip(train(kind, 1024.0, fisher_type=fisher_type),
                             train(kind, None, fisher_type=fisher_type), strict=True):
        torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-7)


def test_a_step_the_scaler_skips_leaves_the_statistics_untouched() -> None:
    model = mlp()
    x, y = batch(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pre = KFAC(model, fisher_type="empirical", grad_scaler=scaler, cov_update_freq=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    states = []
    for poison in (False, True):
        opt.zero_grad()
        loss = TASK.loss(model(x), y) * (float("inf") if poison else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        pre.step()
        scaler.step(opt)
        scaler.update()
        states.append({name: {k: v.clone() for k, v in s.items() if k in ("A", "G")}
                       for name, s in pre.curvature().items()})
    for name, state in states[0].items():
        for key, value in state.items():
            assert torch.equal(states[1][name][key], value), (name, key)
    assert scaler.get_scale() == 512.0  # the scaler did see the overflow


def test_grad_scaler_needs_unscale_before_step() -> None:
    model = mlp()
    x, y = batch(model)
    scaler = torch.amp.GradScaler("cpu")
    pre = KFAC(model, fisher_type="empirical", grad_scaler=scaler)
    scaler.scale(TASK.loss(model(x), y)).backward()
    with pytest.raises(RuntimeError, match=r"scaler.unscale_\(optimizer\) first"):
        pre.step()


class Mixed(nn.Module):
    """One of each layer kind of today's models: what K-FAC covers and what it names."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.pos = nn.Parameter(torch.zeros(6, 8))  # a raw parameter: no layer, no curvature
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.conv((self.emb(tokens) + self.pos).transpose(1, 2)).transpose(1, 2)
        h = self.ln(h)
        h = h + self.att(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def test_the_coverage_report_names_exactly_the_uncovered_parameters(caplog) -> None:
    model = Mixed()
    with caplog.at_level(logging.INFO, logger="ngexp"):
        pre = KFAC(model, fisher_type="empirical")
    plain = ["pos"]
    assert pre.coverage.plain == plain
    assert pre.coverage.covered == ["emb.weight", "conv.weight", "conv.bias", "ln.weight",
                                    "ln.bias", "att.in_proj_weight", "att.in_proj_bias",
                                    "att.out_proj.weight", "att.out_proj.bias", "head.weight",
                                    "head.bias"]
    count = sum(p.numel() for name, p in model.named_parameters() if name in plain)
    assert pre.coverage.plain_count == count
    assert f"1 keep the plain gradient ({count:,} values" in caplog.text
    assert ", ".join(plain) in caplog.text
    natural = NaturalGradient(Mixed())
    assert natural.coverage.plain == [] and natural.coverage.share == 1.0


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.second = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.first(x)), self.second.weight, self.second.bias)


def test_a_layer_called_functionally_is_named_once() -> None:
    model = Functional()
    x, y = batch(mlp())
    pre = KFAC(model, fisher_type="empirical", cov_update_freq=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model.zero_grad()
            TASK.loss(model(x), y).backward()
            pre.step()
    messages = [str(w.message) for w in caught if "never ran" in str(w.message)]
    assert len(messages) == 1 and "'second'" in messages[0]
    assert set(pre.curvature()) == {"first"}


def test_conv1d_factors_equal_those_of_the_equivalent_conv2d() -> None:
    """Conv1d(k) on (B, C, L) is Conv2d((1, k)) on (B, C, 1, L): the same K-FAC factors (the
    Conv2d factors are checked against curvlinops in test_curvature.py)."""
    torch.manual_seed(0)
    conv1 = nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
    conv2 = nn.Conv2d(4, 6, (1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2), groups=2)
    with torch.no_grad():
        conv2.weight.copy_(conv1.weight[:, :, None])
        conv2.bias.copy_(conv1.bias)
    x = torch.randn(5, 4, 11)
    factors = []
    for conv, inputs in ((conv1, x), (conv2, x[:, :, None])):
        model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(3))
        model(inputs)
        torch.manual_seed(1)
        model[2].reset_parameters()
        pre = KFAC(model, fisher_type="empirical")
        TASK.loss(model(inputs), torch.arange(5) % 3).backward()
        layer = pre.layers[0]
        factors.append(kronecker_factors(layer, [PassGroup(-1, pre.capture.passes("training"),
                                                           5)], 5))
    for one, two in zip(*factors, strict=True):
        torch.testing.assert_close(one, two)


class Tokens(nn.Module):
    """Token ids (B, T) -> embedding (lookup, or the same map as a Linear on one-hot rows) ->
    mean over T -> Linear head."""

    def __init__(self, lookup: bool, padding_idx: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lookup = lookup
        self.emb = (nn.Embedding(7, 4, padding_idx=padding_idx) if lookup
                    else nn.Linear(7, 4, bias=False))
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.lookup:
            return self.head(self.emb(tokens).mean(1))
        return self.head(self.emb(F.one_hot(tokens, 7).float()).mean(1))


@pytest.mark.parametrize("kind", [KFAC, EKFAC], ids=["kfac", "ekfac"])
def test_embedding_curvature_is_that_of_a_linear_map_on_one_hot_rows(kind) -> None:
    """nn.Embedding(V, E) is s = W^T onehot(token): its factors (A diagonal: token
    frequencies), EKFAC scaling and direction equal those of nn.Linear(V, E) with weight W^T
    on one-hot rows (the Linear factors are checked against curvlinops in test_curvature.py);
    a padding_idx row gets no gradient and no statistics."""
    tokens = torch.randint(0, 7, (16, 5), generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 3
    results = []
    for lookup in (True, False):
        model = Tokens(lookup)
        if not lookup:
            reference = Tokens(True)
            with torch.no_grad():
                model.emb.weight.copy_(reference.emb.weight.T)
                model.head.load_state_dict(reference.head.state_dict())
        pre = kind(model, fisher_type="empirical", kl_clip=None)
        assert pre.coverage.plain == []
        TASK.loss(model(tokens), y).backward()
        pre.step()
        grad = model.emb.weight.grad
        results.append((pre.curvature()["emb"], grad if lookup else grad.T))
    (lookup_state, lookup_grad), (linear_state, linear_grad) = results
    for key in ("A", "G", "s"):
        if key in linear_state:
            torch.testing.assert_close(lookup_state[key], linear_state[key])
    a = lookup_state["A"][0]
    assert torch.equal(a, torch.diag(a.diagonal()))
    counts = torch.bincount(tokens.flatten(), minlength=7).float() / tokens.numel()
    torch.testing.assert_close(a.diagonal(), counts)
    torch.testing.assert_close(lookup_grad, linear_grad)
    padded = Tokens(True, padding_idx=0)
    pre = kind(padded, fisher_type="empirical", kl_clip=None)
    TASK.loss(padded(tokens), y).backward()
    pre.step()
    assert pre.curvature()["emb"]["A"][0, 0, 0] == 0
    assert torch.all(padded.emb.weight.grad[0] == 0)


class Attention(nn.Module):
    """Multi-head attention, then a Linear head on the mean over positions: with torch's
    ``nn.MultiheadAttention`` (``torch_mha``) or written with four ``nn.Linear`` layers."""

    def __init__(self, torch_mha: bool, cross: bool, batch_first: bool, kdim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.torch_mha, self.cross, self.batch_first = torch_mha, cross, batch_first
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(kdim, 8), nn.Linear(kdim, 8)
        self.out = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():  # the same weights both ways
            weights = (self.mha.in_proj_weight.chunk(3) if self.mha._qkv_same_embed_dim else
                       (self.mha.q_proj_weight, self.mha.k_proj_weight, self.mha.v_proj_weight))
            for linear, weight, bias in zip((self.q, self.k, self.v), weights,
                                            self.mha.in_proj_bias.chunk(3), strict=True):
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
            self.out.load_state_dict(self.mha.out_proj.state_dict())

    def forward(self, x: Tensor) -> Tensor:  # x: (B, L, kdim + 8)
        query, memory = x[..., :8], (x[..., 8:] if self.cross else x[..., :8])
        if self.torch_mha:
            if not self.batch_first:
                query, memory = query.transpose(0, 1), memory.transpose(0, 1)
            h = self.mha(query, memory, memory)[0]
            h = h if self.batch_first else h.transpose(0, 1)
        else:
            heads = lambda t: t.unflatten(-1, (2, 4)).transpose(1, 2)  # noqa: E731
            q, k, v = heads(self.q(query)), heads(self.k(memory)), heads(self.v(memory))
            h = self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return self.head(h.mean(1))


@pytest.mark.parametrize(("cross", "batch_first", "kdim"),
                         [(False, True, 8), (False, False, 8), (True, True, 8), (True, True, 5)],
                         ids=["self", "seq-first", "cross", "kdim"])
@pytest.mark.parametrize("kind", [KFAC, EKFAC], ids=["kfac", "ekfac"])
def test_multihead_attention_projections_equal_four_linear_layers(kind, cross, batch_first,
                                                                    kdim) -> None:
    """nn.MultiheadAttention's q, k, v and out projections get the factors, EKFAC scaling and
    directions of the same attention written with nn.Linear layers (whose factors are checked
    against curvlinops), in packed self-attention, sequence-first, cross-attention and with
    separate key/value sizes."""
    x = torch.randn(6, 5, 8 + kdim, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 3
    states, grads = [], []
    for torch_mha in (True, False):
        model = Attention(torch_mha, cross or kdim != 8, batch_first, kdim)
        pre = kind(model, fisher_type="empirical", kl_clip=None)
        TASK.loss(model(x), y).backward()
        raw = model.mha.in_proj_bias.grad.clone() if torch_mha else None
        pre.step()
        curvature = pre.curvature()
        prefix = "mha." if torch_mha else ""
        states.append([curvature[prefix + role] for role in ("q", "k", "v", "out")])
        if torch_mha:
            assert not torch.equal(model.mha.in_proj_bias.grad, raw)  # preconditioned
            weights = (model.mha.in_proj_weight.grad.chunk(3) if kdim == 8 else
                       [getattr(model.mha, f"{r}_proj_weight").grad for r in ("q", "k", "v")])
            grads.append([*weights, *model.mha.in_proj_bias.grad.chunk(3),
                          model.mha.out_proj.weight.grad, model.mha.out_proj.bias.grad])
        else:
            grads.append([model.q.weight.grad, model.k.weight.grad, model.v.weight.grad,
                          model.q.bias.grad, model.k.bias.grad, model.v.bias.grad,
                          model.out.weight.grad, model.out.bias.grad])
        pre.remove()
    for mha_state, linear_state in zip(*states, strict=True):
        for key in ("A", "G", "s"):
            if key in linear_state:
                torch.testing.assert_close(mha_state[key], linear_state[key], rtol=1e-4,
                                           atol=1e-6)
    for mha_grad, linear_grad in zip(*grads, strict=True):
        torch.testing.assert_close(mha_grad, linear_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("norm", ["layer", "batch2d", "group", "batch1d"])
@pytest.mark.parametrize("kind", [KFAC, EKFAC], ids=["kfac", "ekfac"])
def test_norm_scale_and_shift_equal_a_depthwise_1x1_convolution(kind, norm) -> None:
    """The affine part of a LayerNorm / BatchNorm / GroupNorm, s_c = gamma_c xhat_c + beta_c,
    is a depthwise 1 x 1 convolution of the normalized input: the same per-channel factors,
    EKFAC scaling and directions as the norm without affine followed by that convolution
    (whose factors are checked against curvlinops)."""
    torch.manual_seed(0)
    channels = 4
    make = {"layer": lambda affine: nn.LayerNorm(channels, elementwise_affine=affine),
            "batch2d": lambda affine: nn.BatchNorm2d(channels, affine=affine),
            "group": lambda affine: nn.GroupNorm(2, channels, affine=affine),
            "batch1d": lambda affine: nn.BatchNorm1d(channels, affine=affine)}[norm]
    x = torch.randn(6, 3, 5, 5) if norm != "batch1d" else torch.randn(6, 3, 5)
    y = torch.arange(6) % 3
    conv = (nn.Conv1d if norm == "batch1d" else nn.Conv2d)(3, channels, 3)
    head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    to_last = (lambda t: t.movedim(1, -1)) if norm == "layer" else (lambda t: t)
    from_last = (lambda t: t.movedim(-1, 1)) if norm == "layer" else (lambda t: t)

    class WithNorm(nn.Module):
        def __init__(self, depthwise: bool) -> None:
            super().__init__()
            self.conv, self.norm, self.head = copy.deepcopy(conv), make(not depthwise), head
            self.depthwise = (nn.Conv1d(channels, channels, 1, groups=channels)
                              if depthwise else None)

        def forward(self, x: Tensor) -> Tensor:
            h = from_last(self.norm(to_last(self.conv(x))))
            if self.depthwise is not None:
                h = self.depthwise(h.flatten(2)).view_as(h)
            return self.head(h)

    head(conv(x))  # materialize the lazy head
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_()
    results = []
    for depthwise in (False, True):
        model = WithNorm(depthwise)
        if depthwise:  # gamma, beta after init: make them random on both sides alike
            with torch.no_grad():
                model.depthwise.weight.copy_(results[0][2][:, None, None])
                model.depthwise.bias.copy_(results[0][3])
        else:
            with torch.no_grad():
                model.norm.weight.normal_()
                model.norm.bias.normal_()
        pre = kind(model, fisher_type="empirical", kl_clip=None)
        TASK.loss(model(x), y).backward()
        pre.step()
        block = pre.curvature()["depthwise" if depthwise else "norm"]
        module = model.depthwise if depthwise else model.norm
        results.append((block, (module.weight.grad.flatten(), module.bias.grad),
                        module.weight.detach().flatten().clone(), module.bias.detach().clone()))
        pre.remove()
    (norm_state, norm_grads, *_), (conv_state, conv_grads, *_) = results
    for key in ("A", "G", "s"):
        if key in conv_state:
            torch.testing.assert_close(norm_state[key], conv_state[key], rtol=1e-4, atol=1e-6)
    for mine, theirs in zip(norm_grads, conv_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", [KFAC, EKFAC, NaturalGradient], ids=["kfac", "ekfac", "ng"])
def test_a_step_releases_the_graphs_it_captured(kind) -> None:
    """The capture's gradient hooks refer to its records; once a step is done, nothing of its
    forward (outputs, graph) stays alive (a leak of about a graph per step otherwise)."""
    import gc
    import weakref

    model = Mixed()
    pre = kind(model, **({} if kind is NaturalGradient else {"cov_update_freq": 1}))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randint(0, 10, (8, 6)), torch.arange(8) % 3
    outputs = []
    for _ in range(3):
        opt.zero_grad()
        out = model(x)
        outputs.append(weakref.ref(out))
        pre.backward(TASK.loss(out, y))
        pre.step()
        opt.step()
        del out
    gc.collect()
    assert [ref() is None for ref in outputs] == [True, True, True]


def test_tied_weights_keep_the_plain_gradient_and_are_named() -> None:
    """An embedding tied to the output layer (one parameter, two layers): no Kronecker block
    could hold it, so both layers are left out and the coverage report names the parameter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 7))
    model[3].weight = model[0].weight
    pre = KFAC(model, fisher_type="empirical")
    assert pre.coverage.plain == ["0.weight", "3.bias"]
    assert [layer.name for layer in pre.layers] == ["2"]
    tokens = torch.randint(0, 7, (8,))
    TASK.loss(model(tokens), tokens).backward()
    raw = model[0].weight.grad.clone()
    pre.step()
    assert torch.equal(model[0].weight.grad, raw)
