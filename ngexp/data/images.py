"""Image classification data sets as tensors: torchvision's classes or IDX files on disk.

Fashion-MNIST and MNIST are read directly from the standard IDX ``.gz`` files when found (the
Debian package ``dataset-fashion-mnist`` installs them under ``/usr/share/datasets``); every data
set can also come through torchvision (``data.download=true`` fetches it).
"""

from __future__ import annotations

import functools
import gzip
import os
import typing
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ngexp.data.augment import make_augment
from ngexp.data.bundle import DataBundle, Split
from ngexp.data.spec import DataSpec
from ngexp.errors import UserError
from ngexp.options import check, check_choice, check_integer, checked, configurable

ImageDataset = Literal["fashion_mnist", "mnist", "cifar10", "cifar100", "svhn"]
IMAGE_DATASETS: tuple[str, ...] = typing.get_args(ImageDataset)
NUM_CLASSES = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
TORCHVISION_NAMES = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10",
                     "cifar100": "CIFAR100", "svhn": "SVHN"}


def default_roots(name: str) -> list[Path]:
    """Where a data set is looked for when ``data.root`` is not given, in order."""
    roots = [Path(os.environ["NGEXP_DATA"])] if "NGEXP_DATA" in os.environ else []
    roots.append(Path("data"))
    if name in ("fashion_mnist", "mnist"):
        roots.append(Path("/usr/share/datasets") / name.replace("_", "-"))
    return roots


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (LeCun's format: magic, dims as big-endian int32, uint8 data)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_idx_folder(name: str, root: Path) -> Path | None:
    """The folder under ``root`` holding the four IDX files, plain or in torchvision's layout."""
    for folder in (root, root / TORCHVISION_NAMES[name] / "raw", root / name):
        if all((folder / file).is_file() for pair in IDX_FILES.values() for file in pair):
            return folder
    return None


def _to_split(images: np.ndarray | Tensor, labels: np.ndarray | Tensor | list[int],
              channels_last: bool) -> Split:
    inputs = torch.as_tensor(np.asarray(images)).to(torch.float32).div_(255)
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(1)
    elif channels_last:
        inputs = inputs.permute(0, 3, 1, 2)
    return Split(inputs.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION_NAMES[name])
    splits = []
    for train in (True, False):
        if name == "svhn":
            dataset = cls(str(root), split="train" if train else "test", download=download)
            splits.append(_to_split(dataset.data, dataset.labels, channels_last=False))
        else:
            dataset = cls(str(root), train=train, download=download)
            data = dataset.data.numpy() if isinstance(dataset.data, Tensor) else dataset.data
            splits.append(_to_split(data, dataset.targets, channels_last=data.ndim == 4))
    return splits[0], splits[1]


@functools.lru_cache(maxsize=2)
def load_image_splits(name: str, root: str | None, download: bool) -> tuple[Split, Split]:
    """Train and test splits: inputs float32 in [0, 1] of shape (N, C, H, W), int64 labels.
    The last two data sets read stay cached (runs of a sweep in one process read each once);
    callers must not modify the tensors in place."""
    check_choice("name", name, IMAGE_DATASETS)
    roots = [Path(root)] if root is not None else default_roots(name)
    if name in ("fashion_mnist", "mnist"):
        for candidate in roots:
            folder = find_idx_folder(name, candidate)
            if folder is not None:
                return tuple(  # type: ignore[return-value]
                    _to_split(read_idx(folder / images), read_idx(folder / labels), False)
                    for images, labels in IDX_FILES.values())
    errors = []
    for candidate in roots[:1] if download else roots:
        try:
            return _load_torchvision(name, candidate, download)
        except (RuntimeError, OSError) as error:  # torchvision: "Dataset not found", network
            reason = str(error).splitlines()[0]
            errors.append(f"{candidate} ({reason})" if download else str(candidate))
    hint = ("apt-get install dataset-fashion-mnist, or " if name == "fashion_mnist" else "")
    raise UserError(f"data set {name!r} not found; looked in: {', '.join(errors)}. "
                    f"Get it with: {hint}data.download=true (needs internet), "
                    f"or point data.root=DIR at a folder that holds it")


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Hold out ``val_size`` random training examples (fixed by ``seed``): (train, val)."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    keep, held = order[val_size:].sort().values, order[:val_size].sort().values
    return Split(train.inputs[keep], train.targets[keep]), Split(train.inputs[held],
                                                                 train.targets[held])


def channel_stats(inputs: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of (N, C, ...) inputs (dims after C are pooled)."""
    per_channel = inputs.transpose(0, 1).reshape(inputs.shape[1], -1).double()
    return tuple(per_channel.mean(1).tolist()), tuple(per_channel.std(1).tolist())


def check_image_data(subset: int | None, val_size: int, val_seed: int, **options: object) -> None:
    """Checks of the options image and sequence data sets share (``random_crop`` when given)."""
    check_integer("subset", subset, 1, allow_none=True)
    check_integer("val_size", val_size, 0)
    check_integer("val_seed", val_seed, 0)
    if "random_crop" in options:
        check_integer("random_crop", options["random_crop"], 0)


def prepare_splits(train: Split, test: Split, subset: int | None, val_size: int,
                   val_seed: int) -> tuple[Split, Split | None, Split]:
    """Hold out validation examples, then keep the first ``subset`` training examples."""
    check(val_size < len(train), "data.val_size", val_size,
          f"fewer than the {len(train)} training examples")
    val = None
    if val_size:
        train, val = split_validation(train, val_size, val_seed)
    if subset is not None:
        train = Split(train.inputs[:subset], train.targets[:subset])
    return train, val, test


@configurable("data", "image")
@checked(check_image_data)
def image_data(name: ImageDataset, root: str | None = None, download: bool = False,
               subset: int | None = None, val_size: int = 0, val_seed: int = 0,
               normalize: bool = True, random_crop: int = 0, hflip: bool = False) -> DataBundle:
    """The :class:`DataBundle` of an image data set (on the CPU). ``subset`` keeps the first N
    training examples (after the validation hold-out of ``val_size`` examples drawn with
    ``val_seed``); ``random_crop`` is the padding of a random crop (0 = off), ``hflip`` random
    horizontal flips; ``normalize`` standardizes inputs in the model's first layer."""
    train, test = load_image_splits(name, root, download)
    train, val, test = prepare_splits(train, test, subset, val_size, val_seed)
    mean, std = channel_stats(train.inputs) if normalize else ((0.0,), (1.0,))
    spec = DataSpec(name, tuple(train.inputs.shape[1:]), NUM_CLASSES[name], "classification",
                    mean, std)
    return DataBundle(spec, train, test, val, make_augment(random_crop, hflip))
