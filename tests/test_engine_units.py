"""Trainer pieces: tasks' output curvature, lr schedules, config hashing, schema checks."""

from __future__ import annotations

import math

import pytest
import torch

from ngexp.config import CHOICE_GROUPS, semantic_config, validate
from ngexp.curvature.tasks import Classification, LanguageModel, Reconstruction
from ngexp.train import lr_schedule
from ngexp.train.rundir import config_hash, run_directory
from tests.helpers import compose, requires_fashion_mnist


@pytest.mark.parametrize("task", [Classification(), Reconstruction()])
def test_hessian_vector_product_matches_autograd_hessian(task) -> None:
    torch.manual_seed(0)
    outputs = torch.randn(1, 5, dtype=torch.float64)
    vector = torch.randn(1, 5, dtype=torch.float64)
    targets = torch.tensor([2]) if isinstance(task, Classification) else torch.rand(1, 5).double()
    hessian = torch.autograd.functional.hessian(lambda o: task.loss(o, targets), outputs)
    expected = hessian.reshape(5, 5) @ vector[0]
    assert torch.allclose(task.hessian_vector_product(outputs, vector)[0], expected)


def test_sampled_targets_follow_the_predictive_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20000, 3)
    samples = Classification().sample_targets(logits, torch.Generator().manual_seed(0))
    assert torch.allclose(samples.bincount().double() / 20000,
                          torch.tensor([0.7, 0.2, 0.1]).double(), atol=0.015)
    bits = Reconstruction().sample_targets(torch.zeros(20000, 2), torch.Generator().manual_seed(0))
    assert abs(float(bits.mean()) - 0.5) < 0.015


def test_reconstruction_loss_sums_over_pixels_and_averages_over_examples() -> None:
    outputs, targets = torch.zeros(4, 10), torch.ones(4, 10)
    assert float(Reconstruction().loss(outputs, targets)) == pytest.approx(10 * math.log(2))


def test_language_model_reports_bits_per_character() -> None:
    task = LanguageModel()
    outputs, targets = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    sums = {k: float(v) for k, v in task.metric_sums(outputs, targets).items()}
    metrics = task.finalize(sums, task.num_terms(targets))
    assert metrics["bpc"] == pytest.approx(2.0)  # uniform over 4 symbols = 2 bits


def test_lr_schedules() -> None:
    cosine = lr_schedule.cosine(total_steps=100, steps_per_epoch=10, min_factor=0.1)
    assert cosine(0) == pytest.approx(1.0) and cosine(50) == pytest.approx(0.55)
    assert cosine(100) == pytest.approx(0.1)
    step = lr_schedule.step(100, 10, step_epochs=3, gamma=0.5)
    assert [step(s) for s in (0, 29, 30, 60)] == [1.0, 1.0, 0.5, 0.25]
    multi = lr_schedule.multistep(100, 10, milestones=[2, 5], gamma=0.1)
    assert [multi(s) for s in (19, 20, 49, 50)] == pytest.approx([1, 0.1, 0.1, 0.01])
    warm = lr_schedule.constant(100, 10, warmup_steps=4)
    assert [warm(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_run_hash_ignores_non_semantic_keys_and_seed() -> None:
    base = compose()
    choices = {"data": "fashion_mnist", "model": "mlp", "optimizer": "sgd"}
    same = [compose("trainer.device=cpu", "output_root=/elsewhere", "seed=3",
                    "trainer.log_every=7", "data.root=/x")]
    assert all(config_hash(c) == config_hash(base) for c in same)
    assert config_hash(compose("optimizer.lr=0.3")) != config_hash(base)
    assert run_directory(compose("seed=3"), choices).name == "seed_3"
    assert "trainer" in semantic_config(base) and "output_root" not in semantic_config(base)


def test_every_group_option_composes_and_validates() -> None:
    from tests.helpers import CONF

    for group in CHOICE_GROUPS:
        for option in sorted((CONF / group).glob("*.yaml")):
            validate(compose(f"{group}={option.stem}"))


@requires_fashion_mnist
def test_population_statistics_are_estimated_from_training_batches_before_each_evaluation(
        tmp_path, monkeypatch, capsys, recwarn) -> None:
    """``model.population_stats=training_set``: before every evaluation the trainer hands the
    BN-LSTM the training split in order at the training batch size; it reads
    ``population_examples`` of them (2 batches here) and evaluation uses no moving average."""
    from ngexp.cli import main
    from ngexp.models.bnlstm import BNLSTM

    seen: list[tuple[torch.Tensor, int]] = []
    estimate = BNLSTM.estimate_population_statistics

    def recording(self, batches):
        batches = list(batches)
        used = estimate(self, batches)
        seen.append((batches[0], used))
        return used

    monkeypatch.setattr(BNLSTM, "estimate_population_statistics", recording)
    rc = main(["train", "model=bnlstm", "data=row_fashion_mnist", "data.subset=256",
               "model.hidden_size=16", "model.population_stats=training_set",
               "model.population_examples=64", "trainer.batch_size=32", "trainer.epochs=2",
               "trainer.device=cpu", "trainer.progress=none", f"output_root={tmp_path}"])
    capsys.readouterr()
    assert rc == 0 and not [w for w in recwarn if "moving averages" in str(w.message)]
    assert [used for _, used in seen] == [2, 2]  # one estimate per evaluation (epoch end)
    data = compose("model=bnlstm", "data=row_fashion_mnist", "data.subset=256").data
    from hydra.utils import instantiate

    first = instantiate(data, _partial_=True)().train.inputs[:32]
    assert torch.equal(seen[0][0], first)
