"""Training engine. Importing this package registers the learning-rate schedule schemas."""

from ngexp.train import lr_schedule  # noqa: F401  (registers schemas)
