"""Which way a logged metric improves (torch-free: shared by the trainer and ``ngexp report``).

A metric's leaf name (after the last ``/``) in :data:`LOWER_IS_BETTER` improves downwards
(``test/loss``, ``train/mse``); every other metric (``test/acc``, ...) improves upwards.
"""

from __future__ import annotations

LOWER_IS_BETTER = ("loss", "mse", "bpc")


def lower_is_better(key: str) -> bool:
    return key.split("/")[-1] in LOWER_IS_BETTER


def better(key: str, new: float, old: float | None) -> bool:
    """Whether ``new`` improves on ``old`` (``None``: nothing yet) for metric ``key``."""
    if old is None:
        return True
    return new < old if lower_is_better(key) else new > old
