"""Training engine. Importing this package registers the learning-rate schedule, logger and
callback schemas."""

from ngexp.train import early_stopping, loggers, lr_schedule  # noqa: F401  (registers schemas)
