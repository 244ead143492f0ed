"""Run identity across versions (ngexp/identity.py): a new option leaves every run directory
where it is, a changed default moves the runs that take it, and a directory written by the
previous hashing scheme is found, skipped when finished and resumed when not."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from ngexp import config as ngexp_config
from ngexp import identity
from ngexp.train.rundir import config_hash, run_directory
from tests.helpers import compose, ngexp, read_summary, run_dirs

CONFIGS = [(), ("trainer.max_steps=2",), ("optimizer=kfac", "model=lenet5"),
           ("prune=magnitude",), ("+experiment=lenet5_kfac",), ("optimizer=adam", "seed=2"),
           ("lr_schedule=constant", "optimizer.lr=0.3", "trainer.batch_size=64")]


def previous_hash(cfg: Any) -> str:
    """The hash of the previous scheme (commit e38a688): the whole resolved semantic config,
    defaults included, but trainer.sync_bn at False (its OMITTED_AT_DEFAULT)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ("hydra", "seed", "output_root", "name", "resume", "force"):
        container.pop(key, None)
    for key in ("root", "download"):
        container["data"].pop(key, None)
    for key in ("device", "log_every", "progress", "checkpoint_every", "eval_batch_size",
                "devices"):
        container["trainer"].pop(key, None)
    container["optimizer"].pop("grad_worker_fraction", None)
    if container["trainer"].get("sync_bn") is False:
        container["trainer"].pop("sync_bn")
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def with_dummy_options(monkeypatch: pytest.MonkeyPatch, default: Any = 0.5, *,
                       grad_clip: float | None = None) -> None:
    """Every group schema and the trainer get a new option ``dummy_option`` with a default, as
    a new ngexp version would add one; ``grad_clip`` changes the trainer's default of
    ``grad_clip`` (a changed default)."""
    original = ngexp_config.schema_class

    def schema_class(group: str, name: str, spec: Any) -> type:
        base = original(group, name, spec)
        return dataclasses.make_dataclass(base.__name__, [
            ("dummy_option", float, dataclasses.field(default=default))], bases=(base,))

    trainer = dataclasses.make_dataclass("Trainer", [
        ("dummy_option", float, dataclasses.field(default=default)),
        ("grad_clip", float | None, dataclasses.field(default=grad_clip))],
        bases=(ngexp_config.TrainerConfig,))
    train = dataclasses.make_dataclass("Train", [
        ("trainer", trainer, dataclasses.field(default_factory=trainer))],
        bases=(ngexp_config.TrainConfig,))
    monkeypatch.setattr(ngexp_config, "schema_class", schema_class)
    monkeypatch.setattr(ngexp_config, "TrainConfig", train)


def test_a_new_option_with_a_default_moves_no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    before = [config_hash(compose(*overrides)) for overrides in CONFIGS]
    assert len(set(before)) == len(CONFIGS)
    with_dummy_options(monkeypatch)
    assert compose().optimizer.dummy_option == 0.5 and compose().trainer.dummy_option == 0.5
    assert [config_hash(compose(*overrides)) for overrides in CONFIGS] == before
    # choosing another value of it is another run
    assert config_hash(compose("optimizer.dummy_option=0.7")) != before[0]
    assert config_hash(compose("trainer.dummy_option=0.7")) != before[0]


def test_a_changed_default_moves_the_runs_that_take_it(monkeypatch: pytest.MonkeyPatch) -> None:
    base, clipped = config_hash(compose()), config_hash(compose("trainer.grad_clip=1.0"))
    with_dummy_options(monkeypatch, grad_clip=1.0)
    assert compose().trainer.grad_clip == 1.0
    # the run at the new default is another run than the one at the old default, and the
    # same run as the one that chose that value before the default changed
    assert config_hash(compose()) != base
    assert config_hash(compose()) == clipped
    assert config_hash(compose("trainer.grad_clip=null")) == base


def test_every_option_has_a_recorded_reference_default() -> None:
    missing = identity.unrecorded()
    assert not missing, (f"options without a recorded reference default: {missing}; run "
                         f"`python -m ngexp.identity` and commit ngexp/identity_defaults.json")


def test_group_choices_and_settings_name_the_run() -> None:
    base = compose()
    assert config_hash(compose("lr_schedule=constant")) != config_hash(base)
    assert config_hash(compose("data=mnist")) != config_hash(base)
    assert config_hash(compose("optimizer.lr=0.1")) != config_hash(base)  # sgd's default lr
    assert config_hash(compose("logger=[tensorboard,csv]")) == config_hash(base)


def test_a_stored_config_matches_under_todays_defaults() -> None:
    cfg = compose("trainer.max_steps=2")
    stored = OmegaConf.to_container(cfg, resolve=True)
    assert identity.matches_stored(cfg, stored)
    del stored["trainer"]["sync_bn"]  # written before the option existed
    assert identity.matches_stored(cfg, stored)
    assert not identity.matches_stored(compose("trainer.sync_bn=true", "trainer.max_steps=2"),
                                       stored)
    stored["optimizer"]["lr"] = 0.5
    assert not identity.matches_stored(cfg, stored)
    # another lr schedule with the same settings is another run
    assert not identity.matches_stored(compose("trainer.max_steps=2", "lr_schedule=constant"),
                                       OmegaConf.to_container(cfg, resolve=True))
    stored["optimizer"]["lr"] = cfg.optimizer.lr
    stored["optimizer"]["gone"] = 1  # an option this version does not have: another run
    assert not identity.matches_stored(cfg, stored)


def test_a_run_of_the_previous_scheme_is_skipped_or_resumed(tmp_path: Path) -> None:
    overrides = ("data=synthetic", "trainer.max_steps=2", "trainer.progress=plain")
    ngexp("train", *overrides, f"output_root={tmp_path}")
    (new_dir,) = run_dirs(tmp_path)
    cfg = compose(*overrides, f"output_root={tmp_path}")
    assert new_dir == run_directory(cfg, {"data": "synthetic", "model": "mlp",
                                          "optimizer": "sgd"})
    # the same run as the previous version laid it out, without trainer.sync_bn in its config
    old_dir = new_dir.parents[1] / previous_hash(cfg) / "seed_0"
    assert old_dir != new_dir
    old_dir.parent.mkdir()
    shutil.move(new_dir, old_dir)
    new_dir.parent.rmdir()
    stored = OmegaConf.load(old_dir / "config.yaml")
    del stored.trainer["sync_bn"]
    OmegaConf.save(stored, old_dir / "config.yaml")

    skipped = ngexp("train", *overrides, f"output_root={tmp_path}")
    assert f"skipping {old_dir}: already completed" in skipped.stdout
    assert run_dirs(tmp_path) == [old_dir]

    summary = read_summary(old_dir)
    (old_dir / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    resumed = ngexp("train", *overrides, f"output_root={tmp_path}")
    assert f"using {old_dir}: the run of this config written by an earlier" in resumed.stdout
    assert run_dirs(tmp_path) == [old_dir]
    assert read_summary(old_dir)["status"] == "completed"
