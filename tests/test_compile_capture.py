"""A preconditioner under ``torch.compile`` and ``torch.func.functional_call`` (the capture's
hooks, ngexp/curvature/hooks.py and attention.py).

A compiled model breaks its graph around the hooks' recording (they run eagerly, on the real
tensors between the compiled graphs) on the steps that capture, and compiles whole on the
others. Through AOTAutograd alone (``backend="aot_eager"``: the same aten kernels as eager)
the records and weights are bitwise the eager ones; with inductor's kernels they differ by
float32 rounding. A forward with the covered parameters replaced (``functional_call`` with
other tensors) is an error naming the fix."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ngexp.curvature.capture import Capture
from ngexp.curvature.tasks import Classification
from ngexp.optim import EKFAC, KFAC
from ngexp.optim.preconditioner import Preconditioner
from tests.preconditioning import documented_step, plain_step, sgd

TASK = Classification()
#: Statistics (and the inverses) on steps 0, 2, 4, ...: capturing and plain steps alternate.
SCHEDULE = {"cov_update_freq": 2, "inv_update_freq": 2}
Forward = Callable[[Tensor], Tensor]
Step = Callable[[Forward, Preconditioner, torch.optim.Optimizer, Classification, Tensor,
                 Tensor], None]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch (no recompile limit carried over between tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)  # the weights, and the MC targets' stream (seeded from it)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


class Attention(nn.Module):
    """A LayerNorm and a self-attention block: the attention's projections are captured from
    inside torch's attention function."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return self.head((h + self.attn(h, h, h, need_weights=False)[0]).mean(1))


def batches(steps: int, shape: tuple[int, ...],
            dtype: torch.dtype) -> Iterator[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield (torch.randn(16, *shape, generator=generator).to(dtype),
               torch.randint(0, 3, (16,), generator=generator))


def train(model: nn.Module, make: type[Preconditioner], options: dict[str, object],
          forward: Callable[[nn.Module], Forward], step: Step = documented_step,
          steps: int = 4, shape: tuple[int, ...] = (4,)) -> list[Tensor]:
    """The weights after ``steps`` steps of ``step`` with ``make(model)``, calling
    ``forward(model)`` (the model, or its compiled wrapper)."""
    pre = make(model, **SCHEDULE, **options)
    opt = sgd(model, lr=0.3)
    called = forward(model)
    dtype = next(model.parameters()).dtype
    for x, y in batches(steps, shape, dtype):
        step(called, pre, opt, TASK, x, y)
    return [p.detach().clone() for p in model.parameters()]


def eager(model: nn.Module) -> nn.Module:
    return model


def compiled(backend: str) -> Callable[[nn.Module], Forward]:
    return lambda model: torch.compile(model, backend=backend)


def compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def largest_difference(tensors: list[Tensor], others: list[Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(tensors, others, strict=True))


def assert_equal(tensors: list[Tensor], expected: list[Tensor]) -> None:
    """Bitwise equal, one by one."""
    assert len(tensors) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(tensors, expected, strict=True))


def records_of(pre: Preconditioner) -> list[Tensor]:
    """What the capture holds: each call's input, then its output gradient in each pass."""
    return [tensor for layer in pre.layers for record in layer.records
            for tensor in (*record.inputs, *(grads[c] for grads in record.grads
                                             for c in sorted(grads)))]


class Watched:
    """:func:`documented_step`, keeping the records each ``pre.step()`` reads and the count
    of graphs compiled after each step."""

    def __init__(self) -> None:
        self.records: list[list[Tensor]] = []
        self.graphs: list[int] = []

    def __call__(self, forward: Forward, pre: Preconditioner, opt: torch.optim.Optimizer,
                 task: Classification, x: Tensor, y: Tensor) -> None:
        step = pre.step

        def recorded_step() -> None:
            self.records.append(records_of(pre))
            step()

        with mock.patch.object(pre, "step", recorded_step):
            documented_step(forward, pre, opt, task, x, y)
        self.graphs.append(compiled_graphs())


def assert_trained(weights: list[Tensor], initial: nn.Module) -> None:
    """The steps moved the weights far beyond any tolerance used here."""
    assert largest_difference(weights, [p.detach() for p in initial.parameters()]) > 1e-2


@pytest.mark.parametrize(("make", "options"), [
    (KFAC, {}),  # MC Fisher: sampled passes through the compiled graphs' outputs
    (EKFAC, {"fisher_type": "empirical", "scale_update_freq": 2}),
], ids=["kfac-mc", "ekfac-empirical"])
def test_a_compiled_model_gives_the_eager_records_and_weights_bitwise(
        make: type[Preconditioner], options: dict[str, object]) -> None:
    """``backend="aot_eager"`` runs eager's kernels, so any difference would be the capture's:
    the records each ``pre.step()`` reads and the weights after four steps (two capturing,
    two not) are bitwise the eager ones; the last step reuses what was compiled (no
    recompilation on every step)."""
    eager_run, compiled_run = Watched(), Watched()
    expected = train(mlp(), make, options, eager, eager_run)
    weights = train(mlp(), make, options, compiled("aot_eager"), compiled_run)
    assert_equal(weights, expected)
    for got, want in zip(compiled_run.records, eager_run.records, strict=True):
        assert_equal(got, want)
    assert eager_run.records[0] and eager_run.records[2]  # the statistics steps recorded
    graphs = compiled_run.graphs
    assert graphs[0] > 0 and graphs[3] == graphs[2]  # the last step compiles nothing new
    assert_trained(expected, mlp())


def test_the_plain_loop_with_inductor_gives_the_eager_weights_to_float32_rounding() -> None:
    """The loop of the issue, ``cmodel = torch.compile(model)`` (inductor) and
    ``loss.backward()``, under K-FAC: inductor's kernels round differently from eager's,
    so the tolerance is a small multiple of eager float32's own error, measured against the
    float64 run."""
    options = {"fisher_type": "empirical"}
    exact = train(mlp(torch.float64), KFAC, options, eager, plain_step)
    expected = train(mlp(), KFAC, options, eager, plain_step)
    weights = train(mlp(), KFAC, options, torch.compile, plain_step)
    rounding = largest_difference(expected, exact)
    assert 0 < rounding < 1e-6
    for got, want in zip(weights, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=8 * rounding)
    assert compiled_graphs() > 0
    assert_trained(expected, mlp())


def test_a_compiled_attention_block_gives_the_eager_weights_bitwise() -> None:
    """The attention projections are read from ``F.linear`` calls inside torch's attention
    function, which a compiled forward runs eagerly on capturing steps; the LayerNorm's
    normalized input is computed eagerly too."""
    expected = train(Attention(), KFAC, {}, eager, steps=2, shape=(5, 6))
    weights = train(Attention(), KFAC, {}, compiled("aot_eager"), steps=2, shape=(5, 6))
    assert_equal(weights, expected)
    assert_trained(expected, Attention())


def test_two_captures_of_one_attention_module_record_alike_and_restore_torch() -> None:
    """Two captures recording the same attention forward (a preconditioner and a gradient
    probe, say) leave in the order their hooks run, not the reverse: both record every
    projection call, and torch's functions are restored after."""
    model = Attention()
    originals = F.linear, F.multi_head_attention_forward
    first, second = Capture(model), Capture(model)
    first.active = second.active = True
    x, y = next(batches(1, (5, 6), torch.float32))
    TASK.loss(model(x), y).backward()
    assert (F.linear, F.multi_head_attention_forward) == originals
    recorded = [[tensor for layer in capture.layers for tensor in layer.inputs
                 + [layer.grads[0][c] for c in sorted(layer.grads[0])]]
                for capture in (first, second)]
    assert len(recorded[0]) == 2 * len(first.layers)  # one call of each block
    assert_equal(recorded[1], recorded[0])


def test_functional_call_with_the_models_own_parameters_is_the_plain_loop() -> None:
    """``functional_call(model, dict(model.named_parameters()), x)`` runs the model's own
    parameters: the same weights as calling the model."""
    def call_functionally(model: nn.Module) -> Forward:
        return lambda x: functional_call(model, dict(model.named_parameters()), (x,))

    expected = train(mlp(), KFAC, {}, eager)
    weights = train(mlp(), KFAC, {}, call_functionally)
    assert_equal(weights, expected)


def test_functional_call_with_other_tensors_is_an_error_naming_the_fix() -> None:
    """Other tensors get the gradients (``.grad`` stays ``None``: the step would silently do
    nothing) and the statistics would be of them: an error at the forward, on any step.
    Where nothing is captured (evaluation mode, no grad, inside ``torch.func`` transforms,
    e.g. the curvature products) other tensors are fine."""
    model = mlp()
    pre = KFAC(model, fisher_type="empirical", **SCHEDULE)
    other = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    x, y = next(batches(1, (4,), torch.float32))
    for step in range(2):  # a capturing step and a plain one
        assert pre.captures_next_forward == (step == 0)
        with pytest.raises(RuntimeError, match=r"^KFAC hooks the model's own parameters, but "
                           r"this forward ran with 0\.weight replaced \(torch\.func\."
                           r"functional_call .*dict\(model\.named_parameters\(\)\)$"):
            functional_call(model, other, (x,))
        plain_step(model, pre, sgd(model), TASK, x, y)
        assert pre.steps == step + 1
    with torch.no_grad():
        functional_call(model, other, (x,))
    model.eval()
    functional_call(model, other, (x,))
    model.train()
    grads = torch.func.grad(lambda p: TASK.loss(functional_call(model, p, (x,)), y))(other)
    assert set(grads) == set(other)
