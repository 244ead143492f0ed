"""Character-level language modelling on a user-supplied text file (``data=text data.path=F``).

The vocabulary is the set of characters (Unicode code points) of the whole file, sorted, so
every split is covered. The file is cut into contiguous train / validation / test parts (by
default the last 5% test, the 5% before it validation, as in Mikolov et al. 2012 for text8),
and each part into non-overlapping chunks of ``bptt`` characters: inputs ``s[k : k + bptt]``,
targets ``s[k + 1 : k + bptt + 1]`` (next character at every step). Chunks are independent
examples: truncated back-propagation through time without carrying the hidden state from one
chunk to the next (the setup of Cooijmans et al. 2016, Sec. 5.2-5.3), so evaluation also
restarts from a zero state every ``bptt`` characters. The loss is the mean next-character
cross-entropy; the task reports it in bits per character.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ngexp.data.bundle import DataBundle, Split
from ngexp.data.spec import DataSpec
from ngexp.errors import UserError
from ngexp.options import check, check_integer, check_range, checked, configurable


def read_text(path: str | None) -> str:
    """The contents of ``path`` (UTF-8), or a one-line :class:`UserError` when unset or missing."""
    if path is None:
        raise UserError("data=text needs a text file: data.path=FILE")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"data.path={path!r}: no such file; give a text file with data.path=FILE")
    return file.read_text(encoding="utf-8", errors="replace")


def encode(text: str) -> tuple[Tensor, list[str]]:
    """Token ids ``(len(text),)`` int64 and the vocabulary (sorted distinct characters)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet, ids = np.unique(codes, return_inverse=True)
    return torch.from_numpy(ids.astype(np.int64)), [chr(code) for code in alphabet]


def split_lengths(length: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Sizes of the contiguous train, validation and test parts of ``length`` characters."""
    val, test = int(length * val_fraction), int(length * test_fraction)
    return length - val - test, val, test


def chunk(ids: Tensor, bptt: int, part: str) -> Split:
    """Non-overlapping ``(N, bptt)`` input chunks and their next-character targets."""
    count = (len(ids) - 1) // bptt
    if count < 1:
        raise UserError(f"data.path: the {part} part has {len(ids)} characters, fewer than "
                        f"data.bptt + 1 = {bptt + 1}; use a longer file or a smaller data.bptt")
    inputs = ids[:count * bptt].view(count, bptt)
    targets = ids[1:count * bptt + 1].view(count, bptt)
    return Split(inputs.clone(), targets.clone())


def check_text_data(path: str | None, bptt: int, val_fraction: float, test_fraction: float,
                    subset: int | None, **_: object) -> None:
    check(path is None or Path(path).expanduser().is_file(), "path", path,
          "an existing text file")
    check_integer("bptt", bptt, 1)
    check_range("val_fraction", val_fraction, 0, 1, closed="[)")
    check_range("test_fraction", test_fraction, 0, 1 - val_fraction, closed="()")
    check_integer("subset", subset, 1, allow_none=True)


@configurable("data", "text")
@checked(check_text_data)
def text_data(path: str | None, bptt: int = 100, val_fraction: float = 0.05,
              test_fraction: float = 0.05, subset: int | None = None) -> DataBundle:
    """The :class:`DataBundle` of a character-level language model on the text file ``path``
    (on the CPU; module docstring): ``subset`` keeps the first N training chunks,
    ``val_fraction``/``test_fraction`` are the contiguous validation/test shares. ``path`` is
    required when the data is built (a missing file fails validation at once)."""
    ids, vocabulary = encode(read_text(path))
    num_train, num_val, _ = split_lengths(len(ids), val_fraction, test_fraction)
    train = chunk(ids[:num_train], bptt, "training")
    val = chunk(ids[num_train:num_train + num_val], bptt, "validation") if num_val else None
    test = chunk(ids[num_train + num_val:], bptt, "test")
    if subset is not None:
        train = Split(train.inputs[:subset], train.targets[:subset])
    spec = DataSpec(Path(path).stem, (bptt,), len(vocabulary), "language_model")
    return DataBundle(spec, train, test, val)
