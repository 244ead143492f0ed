"""Sequence data: images read as sequences (sequential / permuted MNIST) and character-level
text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ngexp.curvature.tasks import LanguageModel
from ngexp.data.sequences import (
    downsample_images,
    images_to_sequences,
    pixel_permutation,
    sequence_data,
)
from ngexp.data.text import encode, text_data
from ngexp.errors import UserError
from tests.helpers import compose, requires_fashion_mnist


def test_pixel_and_row_order_read_in_raster_order() -> None:
    images = torch.rand(2, 3, 4, 5)  # (N, C, H, W)
    pixels = images_to_sequences(images, "pixel")
    rows = images_to_sequences(images, "row")
    assert pixels.shape == (2, 20, 3) and rows.shape == (2, 4, 15)
    for r in range(4):
        for c in range(5):
            assert torch.equal(pixels[:, r * 5 + c], images[:, :, r, c])  # step = one pixel
            for k in range(3):
                assert torch.equal(rows[:, r, c * 3 + k], images[:, k, r, c])  # step = one row


def test_permutation_is_a_fixed_true_permutation() -> None:
    perm = pixel_permutation(784, seed=3)
    assert torch.equal(perm.sort().values, torch.arange(784))  # every position exactly once
    assert torch.equal(perm, pixel_permutation(784, seed=3))
    assert not torch.equal(perm, pixel_permutation(784, seed=4))
    assert (perm != torch.arange(784)).float().mean() > 0.9
    images = torch.rand(3, 1, 28, 28)
    sequences = images_to_sequences(images, "pixel", perm)
    assert torch.equal(sequences[:, :, 0], images.flatten(1)[:, perm])
    # the same reordering for every image: the inverse permutation restores the raster order
    restored = torch.empty_like(sequences)
    restored[:, perm] = sequences
    assert torch.equal(restored, images_to_sequences(images, "pixel"))
    # row order cuts the permuted pixels into rows
    assert torch.equal(images_to_sequences(images, "row", perm).flatten(1), sequences.flatten(1))


def test_downsampling_averages_blocks() -> None:
    images = torch.rand(2, 1, 28, 28)
    blocks = images.view(2, 1, 7, 4, 7, 4).mean(dim=(3, 5))
    torch.testing.assert_close(downsample_images(images, 7), blocks)
    torch.testing.assert_close(downsample_images(images, 14), F.avg_pool2d(images, 2))


@requires_fashion_mnist
def test_permuted_downsampled_fashion_mnist_bundle() -> None:
    data = sequence_data("fashion_mnist", order="pixel", downsample=7, permute_seed=5,
                         subset=300, val_size=100, val_seed=1)
    assert data.spec.input_shape == (49, 1) and data.spec.num_classes == 10
    assert data.train.inputs.shape == (300, 49, 1) and data.val.inputs.shape == (100, 49, 1)
    assert data.test.inputs.shape == (10000, 49, 1)
    assert data.train.targets.dtype == torch.int64
    values = data.train.inputs.double()
    assert data.spec.mean[0] == pytest.approx(values.mean().item())
    assert data.spec.std[0] == pytest.approx(values.std().item())
    # the test split went through the same downsampling and permutation
    plain = sequence_data("fashion_mnist", order="pixel", downsample=7, subset=300)
    perm = pixel_permutation(49, 5)
    assert torch.equal(data.test.inputs, plain.test.inputs[:, perm])
    assert not torch.equal(data.test.inputs, plain.test.inputs)


@pytest.mark.parametrize("option", ["seq_mnist", "pseq_mnist", "seq_fashion_mnist",
                                    "pseq_fashion_mnist", "row_mnist", "row_fashion_mnist"])
def test_config_options_compose(option: str) -> None:
    cfg = compose(f"data={option}", "model=bnlstm")
    OmegaConf.to_object(cfg)  # schema range checks
    assert cfg.data._target_ == "ngexp.data.sequences.sequence_data"
    assert cfg.data.order == ("row" if option.startswith("row") else "pixel")
    assert (cfg.data.permute_seed is not None) == option.startswith("pseq")
    assert cfg.model.bn == "all"


def test_bad_sequence_config_values() -> None:
    expected = "data.order='column' is invalid: expected one of pixel, row"
    with pytest.raises(ValueError, match=expected):
        OmegaConf.to_object(compose("data=seq_mnist", "data.order=column"))
    with pytest.raises(ConfigCompositionException, match="random_crop"):  # no such key
        compose("data=seq_mnist", "data.random_crop=4")
    with pytest.raises(ValueError, match="data.downsample=0"):
        OmegaConf.to_object(compose("data=seq_mnist", "data.downsample=0"))


TEXT = "the quick brown fox jumps over the lazy dog. " * 40  # 1800 characters


def test_text_split_vocabulary_and_chunks(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT + "Z")  # 'Z' only in the test part, still in the vocabulary
    ids, vocabulary = encode(TEXT + "Z")
    assert vocabulary == sorted(set(TEXT + "Z"))
    assert "".join(vocabulary[i] for i in ids) == TEXT + "Z"

    data = text_data(str(path), bptt=20, val_fraction=0.1, test_fraction=0.1)
    n = len(TEXT) + 1
    num_val = num_test = int(n * 0.1)
    num_train = n - num_val - num_test
    assert data.spec.task == "language_model" and data.spec.input_shape == (20,)
    assert data.spec.num_classes == len(vocabulary)
    assert data.train.inputs.shape == ((num_train - 1) // 20, 20)
    assert data.val.inputs.shape == ((num_val - 1) // 20, 20)
    assert data.test.inputs.shape == ((num_test - 1) // 20, 20)

    def decode(row: torch.Tensor) -> str:
        return "".join(vocabulary[i] for i in row)

    # contiguous parts, non-overlapping chunks, targets = inputs shifted by one character
    assert decode(data.train.inputs[0]) == TEXT[:20]
    assert decode(data.train.targets[0]) == TEXT[1:21]
    assert decode(data.train.inputs[1]) == TEXT[20:40]
    assert decode(data.val.inputs[0]) == TEXT[num_train:num_train + 20]
    start = num_train + num_val
    assert decode(data.test.inputs[0]) == (TEXT + "Z")[start:start + 20]
    assert data.test.inputs.max() < len(vocabulary)


def test_language_model_task_reports_bits_per_character() -> None:
    outputs = torch.zeros(2, 5, 8)  # uniform prediction over 8 characters -> 3 bits each
    sums = LanguageModel().metric_sums(outputs, torch.zeros(2, 5, dtype=torch.long))
    metrics = LanguageModel().finalize({k: v.item() for k, v in sums.items()}, 10)
    assert metrics["bpc"] == pytest.approx(3.0) and metrics["loss"] == pytest.approx(math.log(8))


def test_missing_or_short_text_file_is_one_clear_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="path=.*nope.txt.* is invalid: expected an existing") \
            as error:
        text_data(missing)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="data.path=.*nope.txt.* is invalid: expected an existing"):
        OmegaConf.to_object(compose("data=text", f"data.path={missing}"))
    with pytest.raises(UserError, match="data=text needs a text file: data.path=FILE"):
        text_data(None)
    short = tmp_path / "short.txt"
    short.write_text("abc" * 10)
    with pytest.raises(UserError, match="fewer than data.bptt"):
        text_data(str(short), bptt=50)


def test_text_experiment_composes(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    cfg = compose("+experiment=bnlstm_text", f"data.path={path}")
    OmegaConf.to_object(cfg)  # schema range checks
    assert cfg.data.bptt == 180 and cfg.model.recurrent_init == "orthogonal"
    assert cfg.trainer.grad_clip == 1.0
