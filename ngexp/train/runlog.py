"""The run's ``train.log``: the ``ngexp`` log and the lines the trainer says, copied to a file
in the run directory while a session runs."""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console

log = logging.getLogger("ngexp")


def say(console: Console, message: str) -> None:
    """A line for the console and the run's ``train.log``."""
    console.print(message, highlight=False)
    log.info(message)


def attach_run_log(path: Path) -> logging.Handler:
    """Copy the ``ngexp`` log (and the lines of :func:`say`) to ``path``."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler


def detach_run_log(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()
