"""DINO multi-crop augmentation of uint8 image tensors.

Two implementations of the same recipe, chosen by `data.batched_crops`:
- per crop (default): one torchvision.transforms.v2 chain per crop;
- batched: the crops of one size are cut from the uint8 image and augmented together as one
  batch (crop_group.py), about 2x faster per loader worker (`dino-bench --data-only`).
Both apply the same operations with the same distributions; they consume the random stream
differently, so the two give different (equally valid) crops for the same seed.
Every random choice is drawn from torch's global RNG, so seeding that RNG right before a call
makes the crops reproducible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from dino_dist.errors import DataError

from .crop_group import IMAGENET_MEAN, IMAGENET_STD, CropGroup

BICUBIC = v2.InterpolationMode.BICUBIC
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128
# (blur, solarize) probabilities: global crop 1 is always blurred; crop 2 (and any further)
# is rarely blurred but may be solarized; the locals are blurred half the time. The asymmetry
# is part of the DINO recipe.
FIRST_GLOBAL_P, OTHER_GLOBAL_P, LOCAL_P = (1.0, 0.0), (0.1, 0.2), (0.5, 0.0)


def blur_and_solarize_p(global_crops_number: int,
                        local_crops_number: int) -> tuple[list[float], list[float]]:
    """Per crop position (global crops first): the blur and the solarize probabilities."""
    pairs = ([FIRST_GLOBAL_P] + [OTHER_GLOBAL_P] * (global_crops_number - 1)
             + [LOCAL_P] * local_crops_number)
    return [blur for blur, _ in pairs], [solarize for _, solarize in pairs]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends on all of (seed, epoch, index).

    A cryptographic hash over an unambiguous text encoding: unlike summing or
    xor-ing, no two different triples map to related seeds.
    """
    key = f"{int(seed)}:{int(epoch)}:{int(index)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def normalise() -> v2.Compose:
    """Image (uint8 or float in [0, 1]) -> float32 normalised with the ImageNet statistics."""
    return v2.Compose([
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def _blur_kernel_size(crop_size: int) -> int:
    # Wide enough for sigma 2 (+-3 sigma), but reflect padding needs the kernel
    # to stay below the crop size, and the size must be odd.
    largest_odd = crop_size if crop_size % 2 else crop_size - 1
    return max(1, min(2 * 6 + 1, largest_odd))


def _crop_pipeline(size: int, scale: Sequence[float], blur_p: float, solarize_p: float,
                   blur_sigma: Sequence[float] = BLUR_SIGMA) -> v2.Compose:
    # Crop first so the colour work runs on the small crop, and stay in uint8
    # until the end: it is cheaper and solarize's threshold is defined on uint8.
    steps = [
        v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur_p > 0:
        blur = v2.GaussianBlur(_blur_kernel_size(size), sigma=tuple(blur_sigma))
        steps.append(blur if blur_p >= 1.0 else v2.RandomApply([blur], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p))
    steps.append(normalise())
    return v2.Compose(steps)


class _PerCropChains:
    """One transforms.v2 chain per crop (the default implementation)."""

    def __init__(self, global_crops_number, global_crop_size, global_crops_scale,
                 local_crops_number, local_crop_size, local_crops_scale, blur_sigma):
        first_global = _crop_pipeline(global_crop_size, global_crops_scale, *FIRST_GLOBAL_P,
                                      blur_sigma=blur_sigma)
        other_global = _crop_pipeline(global_crop_size, global_crops_scale, *OTHER_GLOBAL_P,
                                      blur_sigma=blur_sigma)
        local = _crop_pipeline(local_crop_size, local_crops_scale, *LOCAL_P,
                               blur_sigma=blur_sigma)
        self.pipelines = ([first_global] + [other_global] * (global_crops_number - 1)
                          + [local] * local_crops_number)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [pipeline(image) for pipeline in self.pipelines]


class _BatchedGroups:
    """The crops of each size augmented as one batch (data.batched_crops=true)."""

    def __init__(self, global_crops_number, global_crop_size, global_crops_scale,
                 local_crops_number, local_crop_size, local_crops_scale, blur_sigma):
        blur_p, solarize_p = blur_and_solarize_p(global_crops_number, local_crops_number)
        g = global_crops_number
        self.groups = [CropGroup(global_crop_size, global_crops_scale, blur_p=blur_p[:g],
                                 solarize_p=solarize_p[:g], blur_sigma=blur_sigma)]
        if local_crops_number:
            self.groups.append(CropGroup(local_crop_size, local_crops_scale, blur_p=blur_p[g:],
                                         solarize_p=solarize_p[g:], blur_sigma=blur_sigma))

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [crop for group in self.groups for crop in group(image)]


def check_crops(kind: str, number: int, size: int, scale: Sequence[float], min_number: int) -> None:
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
        *,
        batched: bool,
    ) -> None:
        check_crops("global", global_crops_number, global_crop_size, global_crops_scale, 1)
        check_crops("local", local_crops_number, local_crop_size, local_crops_scale, 0)
        chosen = _BatchedGroups if batched else _PerCropChains
        self.make_crops = chosen(global_crops_number, global_crop_size, global_crops_scale,
                                 local_crops_number, local_crop_size, local_crops_scale,
                                 blur_sigma)
        self.global_crops_number = global_crops_number
        self.local_crops_number = local_crops_number

    @classmethod
    def from_config(cls, data: Any) -> "MultiCropAugmentation":
        """The augmentation a run's `data` settings describe (training, validation loss, bench)."""
        return cls(data.global_crops_number, data.global_crop_size, data.global_crops_scale,
                   data.local_crops_number, data.local_crop_size, data.local_crops_scale,
                   blur_sigma=data.blur_sigma, batched=data.batched_crops)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise TypeError(f"expected a uint8 CHW image tensor, got {image.dtype} of shape {tuple(image.shape)}")
        return self.make_crops(image)

    def __len__(self) -> int:
        return self.global_crops_number + self.local_crops_number


def eval_transform(image_size: int) -> v2.Compose:
    """Resize + center crop (the standard 256/224 ratio) for k-NN evaluation."""
    return v2.Compose([
        v2.Resize(int(image_size * 256 / 224), interpolation=BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        normalise(),
    ])
