"""Data sets as device-resident tensors. Importing this package registers the data schemas."""

from ngexp.data import images, sequences, synthetic, text  # noqa: F401  (registers schemas)
from ngexp.data.bundle import DataBundle, Split
from ngexp.data.spec import DataSpec

__all__ = ["DataBundle", "DataSpec", "Split"]
