"""Image classification as sequence classification: sequential (and permuted) MNIST and kin.

An image ``(C, H, W)`` becomes a sequence ``(T, D)`` read in raster order (Le et al. 2015):

- ``order="pixel"``: one pixel per step, ``T = H * W`` steps of ``D = C`` values
  (pixel-by-pixel MNIST: 784 steps of 1 value);
- ``order="row"``: one row per step, ``T = H`` steps of ``D = W * C`` values (28 x 28).

``downsample=S`` first averages each image down to ``S x S`` (area interpolation; exact 2 x 2
or 4 x 4 block means for 28 -> 14 or 7), e.g. 7 x 7 pixel-by-pixel is 49 steps, a quick CPU
variant. ``permute_seed`` shuffles the ``H * W`` pixel positions with one fixed random
permutation drawn from that seed, the same for every image and split (permuted MNIST); with
``order="row"`` the permuted pixels are then cut into rows.

Inputs stay in [0, 1]; ``spec.mean``/``spec.std`` are one mean and standard deviation over all
training values (applied by the model).
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ngexp.data.bundle import DataBundle, Split
from ngexp.data.images import (
    NUM_CLASSES,
    ImageDataset,
    check_image_data,
    load_image_splits,
    prepare_splits,
)
from ngexp.data.spec import DataSpec
from ngexp.options import check_choice, check_integer, checked, configurable

#: Values of ``data.order``.
Order = Literal["pixel", "row"]
ORDERS: tuple[str, ...] = typing.get_args(Order)


def pixel_permutation(num_pixels: int, seed: int) -> Tensor:
    """A fixed random permutation of ``num_pixels`` positions drawn from ``seed``."""
    return torch.randperm(num_pixels, generator=torch.Generator().manual_seed(seed))


def images_to_sequences(images: Tensor, order: str, permutation: Tensor | None = None) -> Tensor:
    """Images ``(N, C, H, W)`` -> sequences ``(N, T, D)`` in raster order (see module docstring);
    ``permutation`` (of the ``H * W`` positions) reorders the pixels first."""
    check_choice("order", order, ORDERS)
    n, channels, height, width = images.shape
    pixels = images.flatten(2)  # (N, C, H*W), row-major positions
    if permutation is not None:
        pixels = pixels[:, :, permutation]
    pixels = pixels.transpose(1, 2)  # (N, H*W, C)
    if order == "row":
        pixels = pixels.reshape(n, height, width * channels)
    return pixels.contiguous()


def downsample_images(images: Tensor, size: int) -> Tensor:
    """Average ``(N, C, H, W)`` images down to ``(N, C, size, size)`` (area interpolation)."""
    return F.adaptive_avg_pool2d(images, size)


def check_sequence_data(downsample: int | None, permute_seed: int | None,
                        **options: object) -> None:
    check_image_data(**options)  # type: ignore[arg-type]
    check_integer("downsample", downsample, 1, allow_none=True)
    check_integer("permute_seed", permute_seed, 0, allow_none=True)


@configurable("data", "sequence")
@checked(check_sequence_data)
def sequence_data(name: ImageDataset, order: Order = "pixel", downsample: int | None = None,
                  permute_seed: int | None = None, root: str | None = None,
                  download: bool = False, subset: int | None = None, val_size: int = 0,
                  val_seed: int = 0, normalize: bool = True) -> DataBundle:
    """The :class:`DataBundle` of an image data set read as sequences (on the CPU; module
    docstring): ``downsample`` is the side length after averaging (null = full size),
    ``permute_seed`` the seed of the pixel permutation (null = raster order); the other options
    as for :func:`~ngexp.data.images.image_data`."""
    train, test = load_image_splits(name, root, download)
    train, val, test = prepare_splits(train, test, subset, val_size, val_seed)
    height, width = train.inputs.shape[-2:]
    if downsample is not None:
        height = width = downsample
    permutation = None if permute_seed is None else pixel_permutation(height * width,
                                                                      permute_seed)

    def convert(split: Split) -> Split:
        images = split.inputs if downsample is None else downsample_images(split.inputs,
                                                                           downsample)
        return Split(images_to_sequences(images, order, permutation), split.targets)

    train, test = convert(train), convert(test)
    val = convert(val) if val is not None else None
    mean, std = (0.0,), (1.0,)
    if normalize:
        values = train.inputs.double()
        mean, std = (values.mean().item(),), (values.std().item(),)
    label = (f"{name}/{order}" + (f"/{height}x{width}" if downsample is not None else "")
             + (f"/perm{permute_seed}" if permute_seed is not None else ""))
    spec = DataSpec(label, tuple(train.inputs.shape[1:]), NUM_CLASSES[name], "classification",
                    mean, std)
    return DataBundle(spec, train, test, val)
