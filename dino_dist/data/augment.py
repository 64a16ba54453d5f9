"""DINO multi-crop augmentation of uint8 image tensors.

Crops of one size are cut from the uint8 image and then augmented together as one batch
(see crop_group.py); the data benchmark (`dino-bench --data-only`) shows this is several
times faster than one transforms.v2 chain per crop. Every random choice is drawn from torch's
global RNG, so seeding that RNG right before a call makes the crops reproducible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from .crop_group import IMAGENET_MEAN, IMAGENET_STD, CropGroup

BICUBIC = v2.InterpolationMode.BICUBIC
BLUR_SIGMA = (0.1, 2.0)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends on all of (seed, epoch, index).

    A cryptographic hash over an unambiguous text encoding: unlike summing or
    xor-ing, no two different triples map to related seeds.
    """
    key = f"{int(seed)}:{int(epoch)}:{int(index)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _normalise() -> v2.Compose:
    return v2.Compose([
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def _check_crops(kind: str, number: int, size: int, scale: Sequence[float], min_number: int) -> None:
    # Imported here: folder.py imports this module, so a top-level import would be circular.
    from .folder import DataError

    if number < min_number:
        raise DataError(f"data.{kind}_crops_number is {number}: set it to at least {min_number}")
    if size < 1:
        raise DataError(f"data.{kind}_crop_size is {size}: set it to a positive number of pixels")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise DataError(
            f"data.{kind}_crops_scale is {list(scale)}: set it to [low, high] with 0 < low <= high <= 1"
        )


class MultiCropAugmentation:
    """Turns one uint8 CHW image into the DINO crop list: global crops first, then local."""

    def __init__(
        self,
        global_crops_number: int,
        global_crop_size: int,
        global_crops_scale: Sequence[float],
        local_crops_number: int,
        local_crop_size: int,
        local_crops_scale: Sequence[float],
        blur_sigma: Sequence[float] = BLUR_SIGMA,
    ) -> None:
        _check_crops("global", global_crops_number, global_crop_size, global_crops_scale, 1)
        _check_crops("local", local_crops_number, local_crop_size, local_crops_scale, 0)
        # Global crop 1 is always blurred; crop 2 (and any further) is rarely blurred
        # but may be solarized: the asymmetry is part of the DINO recipe.
        other_globals = global_crops_number - 1
        self.crop_groups = [CropGroup(global_crop_size, global_crops_scale,
                                      blur_p=[1.0] + [0.1] * other_globals,
                                      solarize_p=[0.0] + [0.2] * other_globals,
                                      blur_sigma=blur_sigma)]
        if local_crops_number:
            self.crop_groups.append(CropGroup(local_crop_size, local_crops_scale,
                                              blur_p=[0.5] * local_crops_number,
                                              solarize_p=[0.0] * local_crops_number,
                                              blur_sigma=blur_sigma))
        self.global_crops_number = global_crops_number
        self.local_crops_number = local_crops_number

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise TypeError(f"expected a uint8 CHW image tensor, got {image.dtype} of shape {tuple(image.shape)}")
        return [crop for group in self.crop_groups for crop in group(image)]

    def __len__(self) -> int:
        return sum(len(group) for group in self.crop_groups)


def eval_transform(image_size: int) -> v2.Compose:
    """Resize + center crop (the standard 256/224 ratio) for k-NN evaluation."""
    return v2.Compose([
        v2.Resize(int(image_size * 256 / 224), interpolation=BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        _normalise(),
    ])
