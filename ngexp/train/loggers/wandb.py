"""Weights & Biases (``pip install 'ngexp[wandb]'``): offline unless the user is logged in.

``mode`` is ``auto`` by default: ``online`` when an API key is known (``WANDB_API_KEY`` or a
``wandb login`` entry in ``~/.netrc``), else ``offline`` (files under ``<run dir>/wandb``, for
``wandb sync`` later). The W&B run id is kept in ``<run dir>/wandb_run_id``, so a resumed run
continues the same W&B run and a run that starts over (its outputs set aside,
``docs/runs.md``) gets a new one; the project defaults to the run family, the group to the
configuration (seeds side by side). Hyperparameters go to the run config when it starts, metrics
with their step, and the end to the summary (``ngexp/status``) and the exit code.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import secrets
from collections.abc import Mapping
from typing import Any, Literal

from ngexp.errors import UserError
from ngexp.options import configurable
from ngexp.train.loggers.base import Logger, RunInfo


def logged_in() -> bool:
    """Whether W&B has an API key without asking anyone."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


@configurable("logger", "wandb")
class WandbLogger(Logger):
    """See the module docstring."""

    def __init__(self, project: str | None = None, entity: str | None = None,
                 mode: Literal["auto", "online", "offline", "disabled"] = "auto") -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("logger=wandb needs Weights & Biases: pip install 'ngexp[wandb]'") \
                from None
        self._wandb = wandb
        self.project, self.entity, self.mode = project, entity, mode
        self.run: Any = None

    def start(self, run: RunInfo) -> None:
        mode = self.mode if self.mode != "auto" else ("online" if logged_in() else "offline")
        id_file = run.run_dir / "wandb_run_id"
        if run.resumed_step is not None and id_file.is_file():
            identity = id_file.read_text().strip()
        elif run.resumed_step is not None:  # a run of an ngexp that derived it from the path
            identity = hashlib.sha256(str(run.run_dir.resolve()).encode()).hexdigest()[:16]
        else:
            identity = secrets.token_hex(8)
            id_file.write_text(identity + "\n")
        self.run = self._wandb.init(project=self.project or run.name, entity=self.entity,
                                    name=run.run_id, group=run.group, id=identity,
                                    dir=str(run.run_dir), mode=mode, resume="allow",
                                    config=dict(run.hparams), reinit="create_new",
                                    settings=self._wandb.Settings(console="off",
                                                                  silent=True))

    def log(self, step: int, epoch: float, time: float, metrics: Mapping[str, float]) -> None:
        self.run.log({**metrics, "epoch": epoch}, step=step)

    def finish(self, status: str, reason: str | None) -> None:
        self.run.summary["ngexp/status"] = status
        self.run.summary["ngexp/reason"] = reason or ""
        self.run.finish(exit_code=0 if status == "completed" else 1)
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None
