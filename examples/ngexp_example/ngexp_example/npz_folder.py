"""A data set from a folder of NumPy arrays: ``data=npz_folder data.path=DIR``.

``DIR/train.npz`` and ``DIR/test.npz`` each hold ``x`` (``(N, ...)``: images ``(N, C, H, W)``
or ``(N, H, W)``, sequences ``(N, T, D)``, vectors ``(N, D)``) and ``y`` (``(N,)`` integer
class labels in ``0 .. K-1``, ``K`` the number of classes over both files). ``uint8`` inputs
are pixels and are scaled to [0, 1]; other dtypes are taken as they are (as float32).
``val_size``, ``val_seed`` and ``subset`` work as for ngexp's image data (the validation
examples are held out of ``train.npz`` first). ``normalize`` standardizes the inputs in the
model's first layer with the training split's statistics: per channel for images, one mean and
std over all features otherwise.

The folder is ``path``, not ``root``: ngexp leaves ``data.root`` out of a run's identity
(it says where a *named* data set is stored), but here the folder *is* the data set, so two
folders must never share a run directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ngexp.data.bundle import DataBundle, Split
from ngexp.data.images import channel_stats, check_image_data, prepare_splits
from ngexp.data.spec import DataSpec
from ngexp.errors import UserError
from ngexp.options import checked, configurable


def read_split(folder: Path, split: str) -> Split:
    """``folder/<split>.npz`` as a :class:`Split` (float32 inputs, int64 labels); a missing
    file or array, or mismatched lengths, is a one-line :class:`UserError`."""
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise UserError(f"data.path={str(folder)!r}: {path.name} not found (the folder needs "
                        f"train.npz and test.npz, each with arrays x and y)")
    with np.load(path, allow_pickle=False) as arrays:
        missing = [key for key in ("x", "y") if key not in arrays.files]
        if missing:
            raise UserError(f"data.path: {path} has no array {missing[0]!r} (it has "
                            f"{', '.join(arrays.files) or 'none'})")
        x, y = arrays["x"], arrays["y"]
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"data.path: {path}: x {x.shape} and y {y.shape} {y.dtype} need N "
                        f"examples each, x of shape (N, ...) and y integer labels (N,)")
    inputs = torch.from_numpy(x).float()
    if x.dtype == np.uint8:
        inputs = inputs.div_(255)
    if x.ndim == 3 and x.dtype == np.uint8:  # (N, H, W) grey images
        inputs = inputs.unsqueeze(1)
    return Split(inputs.contiguous(), torch.from_numpy(y.astype(np.int64)))


@configurable("data", "npz_folder")
@checked(check_image_data)
def npz_folder(path: str, subset: int | None = None, val_size: int = 0, val_seed: int = 0,
               normalize: bool = True) -> DataBundle:
    """The :class:`DataBundle` of ``path`` (module docstring), on the CPU."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"data.path={path!r} is not a folder")
    train, test = read_split(folder, "train"), read_split(folder, "test")
    if train.inputs.shape[1:] != test.inputs.shape[1:]:
        raise UserError(f"data.path: train.npz has examples of shape "
                        f"{tuple(train.inputs.shape[1:])}, test.npz {tuple(test.inputs.shape[1:])}")
    labels = torch.cat([train.targets, test.targets])
    if int(labels.min()) < 0:
        raise UserError(f"data.path: labels must be >= 0, found {int(labels.min())}")
    train, val, test = prepare_splits(train, test, subset, val_size, val_seed)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    if normalize and train.inputs.ndim == 4:
        mean, std = channel_stats(train.inputs)
    elif normalize:
        flat = train.inputs.double()
        mean, std = (float(flat.mean()),), (float(flat.std()),)
    spec = DataSpec(folder.name, tuple(train.inputs.shape[1:]), int(labels.max()) + 1,
                    "classification", mean, std)
    return DataBundle(spec, train, test, val)

