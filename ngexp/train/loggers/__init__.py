"""Loggers (config group ``logger``, list-valued): TensorBoard (default), CSV, MLflow, W&B, and
``metrics.jsonl``, which every run writes. Importing this package registers their schemas."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ngexp.targets import instantiate
from ngexp.train.loggers import csv, mlflow, tensorboard, wandb  # noqa: F401  (schemas)
from ngexp.train.loggers.base import Logger, MetricsFile, RunInfo, flat_hparams


def build_loggers(nodes: Mapping[str, Any]) -> list[Logger]:
    """The loggers of a run's ``logger`` node (name -> config with ``_target_``); a missing
    optional library (MLflow, W&B) is a one-line error here, before any work."""
    return [instantiate(node, key=f"logger.{name}") for name, node in nodes.items()]


__all__ = ["Logger", "MetricsFile", "RunInfo", "build_loggers", "flat_hparams"]
