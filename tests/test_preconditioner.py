"""Preconditioners as users meet them: the plain PyTorch loop, the documented MC loop, the same
numbers as ``ngexp train``, clear errors on misuse, lr read from the optimizer, schedules,
and the package's layering."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from ngexp.curvature.tasks import Classification
from ngexp.data.images import image_data
from ngexp.models.mlp import MLP
from ngexp.optim import EKFAC, KFAC, TONGA, HessianFree, NaturalGradient
from ngexp.optim.build import build_optimizer
from ngexp.optim.hyperparams import Exponential
from tests.helpers import REPO, compose, ngexp, requires_fashion_mnist, run_dirs
from tests.preconditioning import documented_step, plain_step, sgd

TASK = Classification()


def toy(seed: int = 0) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(6):
        x = torch.randn(16, 5, generator=generator)
        batches.append((x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()))
    return model, batches


# ---------------------------------------------------------------------------- same as the CLI
@requires_fashion_mnist
@pytest.mark.parametrize("name", ["kfac", "ekfac", "natural_gradient"])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_library_loops_give_the_weights_of_ngexp_train(name: str, fisher_type: str,
                                                       tmp_path: Path) -> None:
    """5 steps of the plain loop (empirical Fisher) or the documented MC loop equal ``ngexp
    train`` with the same settings: model init from the seed, batches from the run's generator,
    SGD + momentum from the preconditioner's defaults."""
    if name == "natural_gradient":
        fisher_type = {"empirical": "empirical", "mc": "exact"}[fisher_type]
    ngexp("train", f"optimizer={name}", f"optimizer.fisher_type={fisher_type}",
          "lr_schedule=constant", "data.subset=1000", "trainer.max_steps=5",
          "trainer.log_every=2", "trainer.device=cpu", "trainer.progress=none",
          f"output_root={tmp_path}")
    [run] = run_dirs(tmp_path)
    trained = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]

    torch.manual_seed(0)  # the engine seeds, then builds data, model and preconditioner
    data = image_data("fashion_mnist", subset=1000)
    generator = torch.Generator().manual_seed(0)
    model = MLP(data.spec)
    cls = {"kfac": KFAC, "ekfac": EKFAC, "natural_gradient": NaturalGradient}[name]
    pre = cls(model, fisher_type=fisher_type)
    lr, momentum = (0.1, 0.0) if name == "natural_gradient" else (0.03, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    order = torch.randperm(1000, generator=generator)
    for step in range(5):
        index = order[step * 128:(step + 1) * 128]
        x, y = data.train.inputs[index], data.train.targets[index]
        if fisher_type == "mc":
            documented_step(model, pre, opt, TASK, x, y)
        else:
            plain_step(model, pre, opt, TASK, x, y)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=1e-6)


@requires_fashion_mnist
@pytest.mark.parametrize("name", ["tonga", "hessian_free"])
def test_tonga_and_hessian_free_loops_give_the_weights_of_ngexp_train(name: str,
                                                                       tmp_path: Path) -> None:
    """4 steps of the documented loop with TONGA / Hessian-free and their presets' SGD (lr 1, no
    momentum) equal ``ngexp train``."""
    options = ["optimizer.cg_iters=5"] if name == "hessian_free" else []
    ngexp("train", f"optimizer={name}", *options, "lr_schedule=constant", "data.subset=1000",
          "trainer.max_steps=4", "trainer.log_every=2", "trainer.device=cpu",
          "trainer.progress=none", f"output_root={tmp_path}")
    [run] = run_dirs(tmp_path)
    trained = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]

    torch.manual_seed(0)
    data = image_data("fashion_mnist", subset=1000)
    generator = torch.Generator().manual_seed(0)
    model = MLP(data.spec)
    pre = TONGA(model) if name == "tonga" else HessianFree(model, cg_iters=5)
    opt = sgd(model, lr=1.0)
    order = torch.randperm(1000, generator=generator)
    for step in range(4):
        index = order[step * 128:(step + 1) * 128]
        documented_step(model, pre, opt, TASK, data.train.inputs[index],
                        data.train.targets[index])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=1e-6)


def test_readme_library_snippets_run_and_precondition() -> None:
    """Every Python block of the library section of docs/library.md (once the README's) runs
    as written (``loader`` given) and preconditions every step from captured curvature."""
    text = (REPO / "docs" / "library.md").read_text()
    section = text.split("## Use it as a library", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    assert len(blocks) >= 2
    generator = torch.Generator().manual_seed(0)
    loader = [(torch.rand(32, 1, 28, 28, generator=generator),
               torch.randint(0, 10, (32,), generator=generator)) for _ in range(3)]
    kinds = set()
    namespace: dict = {"loader": loader}  # one session: later blocks use earlier imports
    for block in blocks:
        exec(compile(block, "docs/library.md", "exec"), namespace)  # noqa: S102
        pre = namespace["pre"]
        assert pre.steps == len(loader)
        assert {"A", "G"} <= set(next(iter(pre.curvature().values())))
        kinds.add(pre.fisher_type)
    assert kinds == {"empirical", "mc"}


# ---------------------------------------------------------------------------- misuse
def test_parameters_instead_of_a_model_is_a_clear_error() -> None:
    model, _ = toy()
    with pytest.raises(TypeError, match=r"KFAC\(model, \.\.\.\) takes the nn.Module itself.*"
                                        r"use KFAC\(model\)"):
        KFAC(model.parameters())
    with pytest.raises(ValueError, match="no layer with curvature"):
        KFAC(nn.Sequential(nn.PReLU(3)))
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        NaturalGradient(nn.Sequential(nn.Tanh()))


def test_step_without_statistics_raises_naming_the_fix() -> None:
    model, batches = toy()
    pre = KFAC(model, fisher_type="empirical")
    with pytest.raises(RuntimeError, match="no curvature statistics were ever captured.*"
                                           "loss.backward"):
        pre.step()
    with torch.no_grad():  # a forward without grad captures nothing either
        model(batches[0][0])
    with pytest.raises(RuntimeError, match="no curvature statistics"):
        pre.step()


def test_mc_fisher_with_the_plain_backward_says_what_to_call() -> None:
    model, batches = toy()
    pre, opt = KFAC(model), sgd(model)  # fisher_type="mc" is the default
    x, y = batches[0]
    TASK.loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"fisher_type='mc'\) needs pre.backward\(loss\)"):
        pre.step()
    del opt


def test_optimizer_step_without_pre_step_and_unused_kl_clip_warn_once() -> None:
    model, batches = toy()
    pre, opt = KFAC(model, fisher_type="empirical"), sgd(model, lr=0.1)
    x, y = batches[0]
    opt.zero_grad()
    TASK.loss(model(x), y).backward()
    with pytest.warns(UserWarning, match=r"without KFAC.step\(\): this update used the plain"):
        opt.step()
    other_model, _ = toy(1)  # an optimizer of another model is none of its business
    other = sgd(other_model)
    TASK.loss(model(x), y).backward()
    pre.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.step()
    with pytest.warns(UserWarning, match="kl_clip was not applied"):
        TASK.loss(model(x), y).backward()
        pre.step()  # the previous step's KL clip was never applied by an optimizer


def test_kl_clip_reads_the_current_lr_of_the_optimizer() -> None:
    """The KL factor uses the lr an lr scheduler set for this step: a 10x smaller lr allows a
    10x larger factor (until it reaches 1)."""
    scales = {}
    for factor in (1.0, 0.1):
        model, batches = toy()
        pre = KFAC(model, fisher_type="empirical", kl_clip=1e-6)
        opt = sgd(model, lr=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step, f=factor: f)
        plain_step(model, pre, opt, TASK, *batches[0])
        schedule.step()
        scales[factor] = float(pre.log_metrics()["kl_scale"])
    assert scales[1.0] < 0.1
    assert scales[0.1] == pytest.approx(10 * scales[1.0], rel=1e-5)


# ---------------------------------------------------------------------------- schedules
def test_damping_schedule_from_a_config_target() -> None:
    cfg = compose("optimizer=kfac", "+optimizer.damping={_target_: "
                  "ngexp.optim.hyperparams.Exponential, initial: 0.2, decay: 0.5, every: 2}")
    built = build_optimizer(cfg.optimizer, toy()[0], TASK)
    assert built.preconditioner.damping == Exponential(0.2, 0.5, 2)
    model, batches = toy()
    pre, opt = KFAC(model, damping=Exponential(0.2, 0.5, 2), fisher_type="empirical"), sgd(model)
    seen = []
    for x, y in batches[:3]:
        plain_step(model, pre, opt, TASK, x, y)
        seen.append(pre.log_metrics()["damping"])
    assert seen == pytest.approx([0.2, 0.2 * 0.5**0.5, 0.1])


@pytest.mark.parametrize("base", ["sgd_nesterov", "adam", "rmsprop"])
def test_any_torch_optimizer_steps_the_preconditioned_gradient(base: str) -> None:
    """After ``pre.step()`` the gradients are the directions; the torch optimizer's own update
    rule then applies to them (here: one step from zero state, compared in closed form)."""
    model, batches = toy()
    pre = KFAC(model, fisher_type="empirical", kl_clip=None)
    opt = {"sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
           "adam": lambda p: torch.optim.Adam(p, lr=0.1),
           "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.1)}[base](model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    TASK.loss(model(batches[0][0]), batches[0][1]).backward()
    pre.step()
    directions = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for old, new, d in zip(before, model.parameters(), directions, strict=True):
        if base == "sgd_nesterov":  # buf = d; update = d + 0.9 buf
            expected = old - 0.1 * 1.9 * d
        elif base == "adam":  # first step: m_hat / sqrt(v_hat) = sign(d)
            expected = old - 0.1 * d / (d.abs() + 1e-8)
        else:  # v = 0.01 d^2
            expected = old - 0.1 * d / ((0.01 * d.square()).sqrt() + 1e-8)
        torch.testing.assert_close(new.detach(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- layering
def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every ``ngexp`` module a file imports (anywhere in it, type-checking blocks included):
    ``from ngexp.train import rundir`` imports ``ngexp.train.rundir``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ngexp"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("ngexp")}
    return found - {module_name(path)}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_lower_layers_import_nothing_from_train_and_ngexp_has_no_import_cycle() -> None:
    files = sorted((REPO / "ngexp").rglob("*.py"))
    modules = {module_name(path) for path in files}
    graph = {module_name(path): imports_of(path, modules) for path in files}
    for name, imported in graph.items():
        if name.startswith(("ngexp.optim", "ngexp.prune", "ngexp.curvature")):
            assert not {m for m in imported if m.startswith("ngexp.train")}, name
        if name.startswith("ngexp.curvature"):
            assert not {m for m in imported if m.startswith(("ngexp.optim", "ngexp.prune"))}, name

    def visit(node: str, path: list[str]) -> None:
        for target in graph.get(node, ()):
            assert target not in path, " -> ".join([*path, target])
            visit(target, [*path, target])

    for name in graph:
        visit(name, [name])


def test_a_preconditioner_without_data_parallel_support_refuses_several_ranks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A subclass whose statistics are its rank's own (the base's default) would precondition
    each rank differently: one clear error in a world of 2; ngexp's own declare support."""
    from ngexp.distributed.world import World
    from ngexp.errors import UserError
    from ngexp.optim import preconditioner

    class LocalDiagonal(preconditioner.Preconditioner):
        def _precondition_grads(self) -> list:
            return []

    model = nn.Linear(3, 2)
    LocalDiagonal(model)  # one process: fine
    monkeypatch.setattr(preconditioner, "current", lambda: World(0, 2, 0, 2))
    with pytest.raises(UserError, match="LocalDiagonal does not declare data-parallel support"):
        LocalDiagonal(model)
    assert all(kind.data_parallel for kind in (KFAC, EKFAC, NaturalGradient, HessianFree, TONGA))
