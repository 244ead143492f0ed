"""Data loading, splits, normalization statistics and device-side augmentation."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from ngexp.data.augment import random_crop, random_hflip
from ngexp.data.bundle import Split, epoch_batches, eval_batches
from ngexp.data.images import channel_stats, image_data, read_idx, split_validation
from ngexp.errors import UserError
from tests.helpers import requires_fashion_mnist


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fake_mnist(folder: Path, n_train: int = 40, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_idx_reader_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), array)


def test_image_data_from_idx_folder_with_validation_and_subset(tmp_path: Path) -> None:
    fake_mnist(tmp_path)
    bundle = image_data("mnist", root=str(tmp_path), val_size=10, subset=25)
    assert bundle.spec.input_shape == (1, 28, 28) and bundle.spec.num_classes == 10
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (25, 10, 10)
    assert 0 <= float(bundle.train.inputs.min()) and float(bundle.train.inputs.max()) <= 1
    mean, std = bundle.spec.mean[0], bundle.spec.std[0]
    assert mean == pytest.approx(float(bundle.train.inputs.mean()), rel=1e-5)
    assert std == pytest.approx(float(bundle.train.inputs.std()), rel=1e-4)
    plain = image_data("mnist", root=str(tmp_path), normalize=False)
    assert plain.spec.mean == (0.0,) and plain.spec.std == (1.0,)


def test_missing_data_is_a_user_error_naming_the_place(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nowhere"):
        image_data("mnist", root=str(tmp_path / "nowhere"))


def test_validation_split_is_disjoint_and_fixed_by_seed() -> None:
    split = Split(torch.arange(100.0)[:, None], torch.arange(100))
    train, val = split_validation(split, 20, seed=3)
    again, _ = split_validation(split, 20, seed=3)
    other, _ = split_validation(split, 20, seed=4)
    assert len(train) == 80 and len(val) == 20
    assert set(train.targets.tolist()).isdisjoint(val.targets.tolist())
    assert torch.equal(train.targets, again.targets)
    assert not torch.equal(train.targets, other.targets)


def test_channel_stats_per_channel() -> None:
    x = torch.stack([torch.zeros(5, 4, 4), torch.ones(5, 4, 4) * 2], dim=1)  # (5, 2, 4, 4)
    x[:, 1, 0, 0] = 0
    mean, std = channel_stats(x)
    assert mean[0] == 0 and mean[1] == pytest.approx(2 * 15 / 16)
    assert std[1] == pytest.approx(float(x[:, 1].std()))


def test_random_crop_is_a_shifted_window_of_the_padded_image() -> None:
    images = torch.randn(16, 3, 6, 6)
    crops = random_crop(images, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2,) * 4)
    for image, crop in zip(padded, crops, strict=True):
        windows = [image[:, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(crop, window) for window in windows)
    # some were shifted
    assert not all(torch.equal(c, i) for c, i in zip(crops, images, strict=True))


def test_random_hflip_flips_about_half() -> None:
    images = torch.randn(400, 1, 2, 3)
    flipped = random_hflip(images, torch.Generator().manual_seed(0))
    same = [torch.equal(f, i) for f, i in zip(flipped, images, strict=True)]
    mirrored = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 150 < sum(mirrored) < 250


def test_batches_cover_epoch_in_permutation_order_and_resume_midway() -> None:
    split = Split(torch.arange(10.0)[:, None], torch.arange(10))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    batches = [t.tolist() for _, t in epoch_batches(split, 3, order)]
    assert batches == [order[0:3].tolist(), order[3:6].tolist(), order[6:9].tolist()]
    assert [t.tolist() for _, t in epoch_batches(split, 3, order, start=2)] == batches[2:]
    assert sum(len(t) for _, t in eval_batches(split, 4)) == 10


@requires_fashion_mnist
def test_real_fashion_mnist_found_automatically() -> None:
    bundle = image_data("fashion_mnist")
    assert (len(bundle.train), len(bundle.test)) == (60000, 10000)
    assert bundle.train.targets.bincount().tolist() == [6000] * 10
    assert bundle.spec.mean[0] == pytest.approx(0.2860, abs=1e-3)
