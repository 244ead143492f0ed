"""Every option of every config group, and every setting with fixed choices, runs 3 steps from
the command line or stops with one ``ngexp: error:`` line.

The cases are generated from what is registered, not listed by hand: the options are the YAML
files of ``conf/<group>/``; the settings are the options of every schema (``Literal``
annotations, booleans and choice fields; ``ngexp.options``), each value other than the default
tried once with the first option that uses that schema. So a new option or setting is tested
without anyone remembering to.

To stay fast, runs use tiny data and batches of 8: options and settings outside the data group
train on 64 synthetic 16x16 images (a model that needs sequences gets synthetic 16x16
sequences, one that needs token ids this repository's README as text), the data group's own
options on the first 256 real examples with the MLP. A run may
also end ``failed(nan ...)`` (a diverging combination, e.g. a ReLU autoencoder at SGD's lr):
that is a run state, reported without a traceback. Runs go through
``ngexp.cli.main`` in this process (the same path as the ``ngexp`` command, without paying
Python's and torch's start-up for each case). The VGG experiment presets, whose 512-channel
K-FAC factors make one step cost minutes on a CPU, are marked ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ngexp.cli import default_choices, main, schema_of
from ngexp.config import GROUPS, TrainerConfig, register_all
from ngexp.options import REGISTRY, Option, dataclass_options
from tests.helpers import CONF, requires_fashion_mnist

STEPS = ["trainer.max_steps=3", "trainer.batch_size=8", "trainer.eval_batch_size=512",
         "trainer.log_every=1", "trainer.progress=none"]
SYNTHETIC = ["data=synthetic", "data.shape=[1,16,16]", "data.num_train=64", "data.num_test=16"]
SEQUENCES = ["data=synthetic", "data.shape=[16,16]", "data.num_train=64", "data.num_test=16"]
TEXT = ["data=text", f"data.path={CONF.parent / 'README.md'}", "data.bptt=16"]
#: Settings whose other values only make sense on another machine or change nothing to test.
MACHINE_SETTINGS = {("data", "download")}
#: Presets too slow for a 2-core CI (a K-FAC refresh of VGG's 4608-dim factors takes minutes).
SLOW_EXPERIMENTS = ("vgg16_sgd", "vgg16_kfac", "vgg16_ekfac")


def preset_of(group: str, schema: str, default: str | None) -> str | None:
    """The option a schema's settings are tried with: the group's default option when it uses
    that schema, else the first that does."""
    users = [option for option in group_options(group) if schema_of(group, option) == schema]
    return default if default in users else (users[0] if users else None)


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def setting_values(option: Option) -> list[str]:
    """The command-line values of a setting other than its default."""
    if option.choices is None:
        return []
    return [str(value).lower() if isinstance(value, bool) else str(value)
            for value in option.choices if value != option.default]


def cases() -> list[tuple[str, list[str]]]:
    """``(case id, overrides)`` of every option and setting (module docstring)."""
    register_all()
    found: list[tuple[str, list[str]]] = []
    for group in GROUPS:
        for option in group_options(group):
            data = [] if group == "data" else SYNTHETIC
            found.append((f"{group}={option}", [f"{group}={option}", *data]))
    for option in group_options("experiment"):
        found.append((f"+experiment={option}", [f"+experiment={option}", *SYNTHETIC]))
    defaults = default_choices()
    for group, specs in REGISTRY.items():
        for name, spec in specs.items():
            preset = preset_of(group, name, defaults.get(group))
            if preset is None:
                continue
            data = [] if group == "data" else SYNTHETIC
            preset_values = OmegaConf.load(CONF / group / f"{preset}.yaml")
            for setting in spec.options():
                if (group, setting.name) in MACHINE_SETTINGS:
                    continue
                for value in setting_values(setting):
                    if str(preset_values.get(setting.name, "")).lower() == value.lower():
                        continue  # what the preset sets already
                    key = f"{group}.{setting.name}={value}"
                    found.append((f"{preset}:{key}", [f"{group}={preset}", key, *data]))
    for setting in dataclass_options(TrainerConfig):
        for value in setting_values(setting):
            found.append((f"trainer.{setting.name}={value}",
                          [f"trainer.{setting.name}={value}", *SYNTHETIC]))
    return found


CASES = cases()


def params() -> list:
    marks = {case: [pytest.mark.slow] for case, _ in CASES
             if any(case == f"+experiment={name}" for name in SLOW_EXPERIMENTS)}
    return [pytest.param(overrides, id=case, marks=marks.get(case, []))
            for case, overrides in CASES]


def run(overrides: list[str], root: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = main(["train", *STEPS, *overrides, f"output_root={root}"])
    return rc, capsys.readouterr().err


@requires_fashion_mnist
@pytest.mark.parametrize("overrides", params())
def test_runs_three_steps_or_stops_with_one_line(overrides: list[str], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: logger=wandb stays offline
    if not any(o.startswith("data=synthetic") for o in overrides):  # a real data set
        overrides = [*overrides, "data.subset=256"]
    rc, err = run(overrides, tmp_path, capsys)
    if rc != 0 and ("does not fit data=synthetic" in err or "needs sequences" in err):
        data = TEXT if "needs tokens" in err else SEQUENCES
        overrides = [o for o in overrides if o not in SYNTHETIC] + data
        rc, err = run(overrides, tmp_path / "sequences", capsys)
    summaries = [json.loads(path.read_text()) for path in tmp_path.rglob("summary.json")]
    if rc == 0:
        assert summaries and summaries[-1]["status"] == "completed", summaries
        assert summaries[-1]["step"] == 3
    elif rc == 1 and summaries and str(summaries[-1]["reason"]).startswith("nan"):
        assert summaries[-1]["status"] == "failed" and "Traceback" not in err, err
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("ngexp: error: "), err
