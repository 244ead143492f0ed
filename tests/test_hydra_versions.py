"""ngexp on Hydra 1.3 and 1.4 alike (:mod:`ngexp.hydra_compat`): ``ngexp train`` and an Optuna
sweep print no warning. The normal suite runs these under the main venv's Hydra 1.3;
``make test-hydra14`` runs them under Hydra 1.4 and omegaconf 2.4 (``.venv-hydra14``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import hydra
import pytest

from ngexp import hydra_compat
from tests.helpers import ngexp, requires_fashion_mnist, run_dirs

try:
    import hydra_plugins.hydra_optuna_sweeper  # noqa: F401

    HAVE_OPTUNA = True
except ImportError:
    HAVE_OPTUNA = False
TINY = ("trainer.max_steps=3", "trainer.epochs=1", "trainer.progress=none", "logger=[]")


def warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "warn" in line.lower()]


def quiet_ngexp(*args: str, **kwargs):
    """``ngexp ARGS`` under Python's default warning filters; asserts it printed no warning."""
    saved = os.environ.pop("PYTHONWARNINGS", None)  # what a user sees: the default filters
    try:
        result = ngexp(*args, **kwargs)
    finally:
        if saved is not None:
            os.environ["PYTHONWARNINGS"] = saved
    assert not warning_lines(result.stderr), (f"hydra-core {hydra.__version__} warned:\n"
                                              f"{result.stderr}")
    assert not warning_lines(result.stdout), result.stdout
    return result


def test_version_base_is_the_one_each_hydra_takes_silently() -> None:
    expected = {} if hydra_compat.HYDRA_VERSION >= (1, 4) else {"version_base": "1.3"}
    assert hydra_compat.VERSION_BASE == expected
    assert hydra_compat.version_tuple("1.4.0rc3") == (1, 4)
    assert hydra_compat.version_tuple("1.3.8") == (1, 3)


def test_registering_the_schemas_again_does_not_warn() -> None:
    from hydra.core.config_store import ConfigStore

    from ngexp.config import register_all

    register_all()  # the imports it makes warn or not on their own
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        register_all()
        register_all()
    assert not [str(w.message) for w in caught]
    assert ConfigStore.instance().load("schema/optimizer/sgd.yaml").provider == "ngexp"


def test_an_optuna_sweeper_of_the_other_hydra_line_is_named(monkeypatch) -> None:
    from importlib import metadata

    target = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    old = "1.3.0" if hydra_compat.HYDRA_VERSION >= (1, 4) else "1.4.0rc3"
    monkeypatch.setattr(metadata, "version", lambda name: old)
    assert f"hydra-optuna-sweeper {old} does not work with hydra-core" in \
        hydra_compat.plugin_mismatch(target)
    monkeypatch.setattr(metadata, "version", lambda name: hydra.__version__)
    assert hydra_compat.plugin_mismatch(target) is None
    assert hydra_compat.plugin_mismatch("hydra._internal.core_plugins.basic_sweeper.X") is None


@requires_fashion_mnist
def test_the_default_run_prints_no_warning(tmp_path: Path) -> None:
    """The default run (an MLP on Fashion-MNIST, TensorBoard logger), a few steps."""
    quiet_ngexp("train", "trainer.max_steps=5", "trainer.epochs=1", "trainer.progress=plain",
                f"output_root={tmp_path}")
    assert len(run_dirs(tmp_path)) == 1


@pytest.mark.skipif(not HAVE_OPTUNA, reason="hydra-optuna-sweeper not installed (ngexp[tune])")
def test_a_two_trial_optuna_sweep_prints_no_warning(tmp_path: Path) -> None:
    result = quiet_ngexp("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                         "hydra.sweeper.sampler.seed=0", "objective=test/loss",
                         "optimizer.lr=tag(log, interval(0.001,0.3))", "data=synthetic", *TINY,
                         f"output_root={tmp_path}", timeout=600)
    assert len(run_dirs(tmp_path)) == 2
    assert "Best value" in result.stdout + result.stderr
