"""Batched image augmentation on the training device (no PIL, no per-example Python loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ngexp.data.bundle import Augment


def random_crop(images: Tensor, padding: int, generator: torch.Generator | None) -> Tensor:
    """Zero-pad (N, C, H, W) images by ``padding`` and take one random H x W crop per image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, n, 1), device=images.device,
                            generator=generator)
    rows = offsets[0] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[1] + torch.arange(w, device=images.device)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()


def random_hflip(images: Tensor, generator: torch.Generator | None) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def make_augment(crop_padding: int, hflip: bool) -> Augment | None:
    """The training transform for the given options, or ``None`` when both are off."""
    if not crop_padding and not hflip:
        return None

    def augment(images: Tensor, generator: torch.Generator | None) -> Tensor:
        if crop_padding:
            images = random_crop(images, crop_padding, generator)
        if hflip:
            images = random_hflip(images, generator)
        return images

    return augment
