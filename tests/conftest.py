"""pytest hooks: one thread per xdist worker, and CUDA hidden unless the ``gpu`` tests are
selected. Shared helpers are in ``tests/helpers.py``."""

from __future__ import annotations

import os
import re

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """Unless the ``gpu`` tests are selected (``make test-gpu``), every test and every ``ngexp``
    it starts runs on the CPU, as in CI, also on a machine with a GPU (``trainer.device=auto``
    is the default): CUDA is hidden before anything initializes it."""
    if not re.search(r"(?<!not )\bgpu\b", config.getoption("markexpr") or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
