"""The GPU path, checked on the CPU: no host/device synchronization in the training step, a
compiled forward that trains the same weights as the eager one (preconditioners included),
resumes whose RNG states and step counters stay on the host, NaN logits under the Monte-Carlo
Fisher, float32 curvature under bf16 autocast, deterministic cuBLAS, parameter strides kept
under ``channels_last``, no device-less tensor factories, a per-window memory peak, and a
``gpu`` marker that selects the GPU tests (``tests/test_gpu.py``)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ngexp.cli import main
from ngexp.curvature.tasks import Classification
from ngexp.optim.build import build_optimizer
from ngexp.optim.kfac import KFAC
from ngexp.train import checkpoint
from ngexp.train.metric_window import resident_peak_mb
from tests.helpers import REPO, compose, read_summary, run_dirs
from tests.step_path import NGEXP, SyncCounter, trainer_for, training_batches

#: LeNet-5 on 28x28 synthetic images, 32 examples per step, on the CPU.
LENET = ["model=lenet5", "data=synthetic", "data.shape=[1,28,28]", "data.num_train=256",
         "data.num_test=64", "trainer.batch_size=32", "trainer.device=cpu",
         "trainer.progress=none"]
#: Statistics every 2 steps, refreshes every 3.
SCHEDULE = ["optimizer.cov_update_freq=2", "optimizer.inv_update_freq=3"]

#: Host reads ngexp makes on purpose in the step, and why none of them waits for a GPU.
HOST_SIDE = {
    "kfac.py:_factored_direction": "the CPU-only factored product verifies .grad on the CPU",
    "linalg.py:conjugate_gradient": "CG reads its stop mask to exit early on the CPU only",
    "products.py:__init__": "the curvature product's seed comes from torch's CPU generator",
}


# ---------------------------------------------------------------------------- no syncs
@pytest.mark.parametrize("optimizer", [
    ["optimizer=sgd", "trainer.grad_clip=1.0", "data.random_crop=2", "data.hflip=true"],
    ["optimizer=adam"],
    ["optimizer=kfac", *SCHEDULE],
    ["optimizer=kfac", "optimizer.fisher_type=empirical", "optimizer.kl_clip=null", *SCHEDULE],
    ["optimizer=kfac", "optimizer.damping_schedule=adaptive", "optimizer.adapt_interval=2",
     *SCHEDULE],
    ["optimizer=kfac", "optimizer.damping_mode=eigen", *SCHEDULE],
    ["optimizer=ekfac", *SCHEDULE],
    ["optimizer=natural_gradient", "optimizer.cg_iters=3"],
    ["optimizer=tonga", "optimizer.refresh_interval=2"],
    ["optimizer=kfac", "prune=variational_bernoulli", "prune.fix_every=1000", *SCHEDULE],
    ["optimizer=ekfac", "prune=spike_and_slab", "prune.fix_every=1000", *SCHEDULE],
], ids=["sgd-clip-augment", "adam", "kfac", "kfac-empirical", "kfac-adaptive", "kfac-eigen",
        "ekfac", "natural_gradient", "tonga", "kfac-variational_bernoulli",
        "ekfac-spike_and_slab"])
def test_the_training_step_never_waits_for_the_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: list[str]) -> None:
    """Outside logging, evaluation and checkpoint steps (none here: they run between steps),
    the step reads nothing back from the device but, for K-FAC with factored damping, one flag
    per inversion (whether any Cholesky factorization failed): at each refresh, and after
    each adaptive damping change."""
    trainer = trainer_for(tmp_path, *LENET, *optimizer, "trainer.log_every=1000")
    counter = SyncCounter(monkeypatch)
    batches = training_batches(trainer)
    factored_kfac = ("optimizer=kfac" in optimizer
                     and "optimizer.damping_mode=eigen" not in optimizer)
    adaptive = "optimizer.damping_schedule=adaptive" in optimizer
    for step in range(7):
        with counter.counting() as calls:
            trainer.train_step(*next(batches))
        inversions = calls.pop("linalg.py:damped_inverses", 0)
        assert {site: n for site, n in calls.items() if site not in HOST_SIDE} == {}, step
        refresh = factored_kfac and step % 3 == 0
        assert inversions <= 1 if adaptive else inversions == int(refresh), step


# ---------------------------------------------------------------------------- compile
@pytest.mark.parametrize(("optimizer", "compiled_steps"), [
    (["optimizer=sgd"], 5),
    (["optimizer=kfac", *SCHEDULE], 2),  # statistics on steps 0, 2, 4
    # one eigenbasis (step 0): a later one would come from rank-deficient factors, whose
    # null-space eigenvectors are any basis of that space, so that EKFAC's scaling there is not
    # continuous in the rounding by which compiled and eager kernels differ
    (["optimizer=ekfac", "optimizer.scale_update_freq=2", "optimizer.cov_update_freq=2",
      "optimizer.inv_update_freq=100"], 2),
], ids=["sgd", "kfac", "ekfac"])
def test_compiled_and_eager_training_give_the_same_weights(
        tmp_path: Path, optimizer: list[str], compiled_steps: int) -> None:
    """Five steps with ``trainer.compile=true`` and without; the compiled forward runs on the
    steps no preconditioner captures (all of SGD's, K-FAC's and EKFAC's non-statistics
    steps), the eager model with its hooks on the others. At batch 128 K-FAC's CPU-only
    factored product (which captures every step) does not pay, so K-FAC compiles too."""
    weights, compiled_calls = {}, {}
    for compiled in (False, True):
        trainer = trainer_for(tmp_path / str(compiled), *LENET, *optimizer,
                            "trainer.batch_size=128", "data.num_train=640",
                            f"trainer.compile={str(compiled).lower()}", "trainer.log_every=1000")
        calls = []
        compiled_forward = trainer.run.forward
        trainer.run.forward = lambda x, forward=compiled_forward, calls=calls: (
            calls.append(1) or forward(x))
        batches = training_batches(trainer)
        for _ in range(5):
            trainer.train_step(*next(batches))
        weights[compiled], compiled_calls[compiled] = trainer.model.state_dict(), len(calls)
        if compiled:
            assert isinstance(compiled_forward, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled_calls == {False: compiled_steps, True: compiled_steps}
    for name, eager in weights[False].items():
        torch.testing.assert_close(weights[True][name], eager, rtol=1e-3, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    initial = trainer_for(tmp_path / "init", *LENET, *optimizer).model.state_dict()
    moved = max(float((weights[False][name] - value).abs().max())
                for name, value in initial.items())
    assert moved > 1e-2  # the five steps trained, well beyond the tolerance


# ---------------------------------------------------------------------------- resume
def test_a_load_onto_another_device_keeps_rng_states_and_step_counters_on_the_host(
        tmp_path: Path) -> None:
    """A checkpoint read for a run on another device (``meta`` stands in for a GPU): the RNG
    states come back as CPU byte tensors torch accepts, Adam's moments move to the parameters'
    device and its step counters stay on the host (no sync per parameter per step)."""
    cfg = compose(*LENET, "optimizer=adam", f"output_root={tmp_path}")
    task = Classification()
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    optimizer = build_optimizer(cfg.optimizer, model, task)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(3)
    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, {"optimizer": optimizer.state_dict(),
                                      "rng": checkpoint.rng_state(generator)})
    expected = torch.rand(3, generator=generator), torch.rand(3)

    state = checkpoint.read_checkpoint(path)
    on_meta = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to("meta")
    meta_optimizer = build_optimizer(cfg.optimizer, on_meta, task)
    meta_optimizer.load_state_dict(state["optimizer"])
    for param, values in meta_optimizer.optimizer.state.items():
        assert param.device.type == "meta"
        assert values["step"].device.type == "cpu" and float(values["step"]) == 1
        assert values["exp_avg"].device.type == "meta"
    resumed = torch.Generator()
    checkpoint.set_rng_state(state["rng"], resumed)
    assert torch.equal(torch.rand(3, generator=resumed), expected[0])
    assert torch.equal(torch.rand(3), expected[1])


# ---------------------------------------------------------------------------- divergence
def test_nan_logits_under_the_monte_carlo_fisher_end_the_run_failed_nan(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """K-FAC at an lr that overflows the weights: the targets sampled from NaN logits do not
    raise (a device-side assert on a GPU), the run ends ``failed(nan at step N)``."""
    rc = main(["train", *LENET, "model=mlp", "optimizer=kfac", "optimizer.fisher_type=mc",
               "optimizer.cov_update_freq=1", "optimizer.lr=1e30", "optimizer.kl_clip=null",
               "trainer.epochs=2", f"output_root={tmp_path}"])
    capsys.readouterr()
    [run] = run_dirs(tmp_path)
    summary = read_summary(run)
    assert rc == 1 and summary["status"] == "failed"
    assert re.fullmatch(r"nan at step \d+", summary["reason"]), summary["reason"]


# ---------------------------------------------------------------------------- bf16
class SmallConvNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_under_bf16_autocast_the_sampled_loss_and_every_factor_are_float32(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward runs in bf16; the Monte-Carlo losses are computed from float32 logits and
    the factors are float32, equal to the float32 moments of the captured bf16 rows."""
    torch.manual_seed(0)
    model, task = SmallConvNet(), Classification()
    kfac = KFAC(model, task=task, fisher_type="mc", stat_decay=0.0, kl_clip=None)
    losses: list[tuple[torch.dtype, torch.dtype]] = []
    loss = task.loss

    def recording_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = loss(outputs, targets)
        losses.append((outputs.dtype, value.dtype))
        return value

    monkeypatch.setattr(task, "loss", recording_loss)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(5, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(inputs)
        train_loss = loss(outputs, targets)
    assert outputs.dtype == torch.bfloat16
    linear = kfac.capture.layers[-1]
    kfac.backward(train_loss, outputs, targets)
    assert linear.inputs[0].dtype == torch.bfloat16
    rows = linear.input_rows(linear.inputs[0])  # [a; 1] of the bf16 forward, as float32
    kfac.step()
    assert losses == [(torch.float32, torch.float32)]  # the one sampled pass
    for name, terms in kfac.curvature().items():
        assert {key: value.dtype for key, value in terms.items()} == dict.fromkeys(
            terms, torch.float32), name
    expected_a = rows.flatten(0, 2).T @ rows.flatten(0, 2) / 16
    torch.testing.assert_close(kfac.curvature()[linear.name]["A"][0], expected_a)


def test_adaptive_damping_evaluates_the_loss_after_the_step_under_the_steps_autocast() -> None:
    """The reduction ratio compares the step's bf16-autocast loss with the loss after the step
    computed the same way (not an fp32 forward against a bf16 one)."""
    torch.manual_seed(0)
    model, task = SmallConvNet(), Classification()
    kfac = KFAC(model, task=task, damping_schedule="adaptive", adapt_interval=1, kl_clip=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen: list[torch.dtype | None] = []
    model.register_forward_hook(lambda m, a, out: seen.append(
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(5, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(inputs)
        loss = task.loss(outputs, targets)
    kfac.backward(loss, outputs, targets)
    kfac.step()
    optimizer.step()
    assert seen == [torch.bfloat16, torch.bfloat16]  # the step's forward and the re-evaluation
    assert bool(torch.isfinite(kfac._damping.rho))


# ---------------------------------------------------------------------------- settings
def test_deterministic_mode_sets_the_cublas_workspace(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        trainer_for(tmp_path, *LENET, "trainer.deterministic=true")
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_gpu_marker_selects_the_gpu_tests() -> None:
    """``make test-gpu`` (``pytest -m gpu``) has tests to run; here they are skipped."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only",
                             "-q", "-p", "no:xdist", "tests/"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(collected) >= 5 and all(line.startswith("tests/test_gpu.py::")
                                       for line in collected), result.stdout
    assert any("never_waits" in line for line in collected)


@pytest.mark.parametrize("optimizer", [["optimizer=sgd"], ["optimizer=adam"],
                                       ["optimizer=kfac", *SCHEDULE],
                                       ["optimizer=ekfac", *SCHEDULE]],
                         ids=["sgd", "adam", "kfac", "ekfac"])
def test_gradients_and_optimizer_buffers_keep_the_parameters_strides(
        tmp_path: Path, optimizer: list[str]) -> None:
    """Under ``channels_last`` the preconditioned ``.grad`` and every optimizer buffer have
    their parameter's strides (so the fused multi-tensor updates apply)."""
    trainer = trainer_for(tmp_path, *LENET, *optimizer, "trainer.channels_last=true",
                        "trainer.log_every=1000")
    batches = training_batches(trainer)
    for _ in range(3):
        trainer.train_step(*next(batches))
    convs = [p for p in trainer.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    for param in trainer.model.parameters():
        assert param.grad.stride() == param.stride()
        buffers = [value for value in trainer.optimizer.optimizer.state[param].values()
                   if isinstance(value, torch.Tensor) and value.shape == param.shape]
        assert buffers and all(b.stride() == param.stride() for b in buffers)


# ---------------------------------------------------------------------------- audits
FACTORIES = {"zeros", "ones", "empty", "full", "eye", "arange", "tensor", "as_tensor", "rand",
             "randn", "randint", "randperm", "linspace", "logspace"}
#: Device-less factory calls that mean the host: ``file:function`` and why.
HOST_TENSORS = {
    "kfac.py:_factored_direction": "probes of the CPU-only factored product",
    "tangent.py:probe_indices": "probe indices drawn on the host from host labels",
}


def factory_calls_without_device(package: Path = NGEXP) -> list[str]:
    """``file:line function`` of every ``torch.<factory>(...)`` in ``package`` without
    ``device=``, outside module constructors (moved with the module) and the data sets (built
    on the host, then moved whole)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.is_relative_to(package / "data"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if function.name in ("__init__", "reset_parameters"):
                continue
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                        and node.func.attr in FACTORIES
                        and not any(k.arg == "device" for k in node.keywords)
                        and f"{path.name}:{function.name}" not in HOST_TENSORS):
                    found.append(f"{path.relative_to(package)}:{node.lineno} {function.name}")
    return sorted(set(found))


def test_no_tensor_factory_call_without_a_device() -> None:
    assert factory_calls_without_device() == []


def test_the_factory_audit_finds_a_device_less_call(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data/images.py").write_text("import torch\n\ndef load(n):\n"
                                             "    return torch.arange(n)\n")
    (tmp_path / "index.py").write_text("import torch\n\nclass M:\n    def __init__(self):\n"
                                       "        self.i = torch.arange(3)\n\n"
                                       "    def index(self, n, x):\n"
                                       "        return torch.arange(n, device=x.device), "
                                       "torch.arange(n)\n")
    assert factory_calls_without_device(tmp_path) == ["index.py:8 index"]


def test_peak_memory_is_the_peak_of_each_window() -> None:
    """``train/peak_mem_mb`` on the CPU: the resident peak since the previous record."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    resident_peak_mb()
    block = torch.ones(64 * 2**20)  # 256 MB, touched
    del block
    with_block = resident_peak_mb()
    without_block = resident_peak_mb()
    assert with_block - without_block > 200
