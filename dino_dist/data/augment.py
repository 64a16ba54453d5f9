"""DINO multi-crop augmentation of uint8 image tensors, in a loader process.

Two implementations of the recipe (recipe.py says which is used when, and why), chosen by
`data.batched_crops`: one torchvision transforms.v2 chain per crop (here), or the crops of
each size augmented as one stack (crop_group.py). Every random choice is drawn from torch's
global RNG, so seeding that RNG right before a call makes the crops reproducible.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torchvision.transforms import v2

from .crop_group import CropGroup
from .recipe import IMAGENET_MEAN, IMAGENET_STD, MAX_BLUR_RADIUS, CropKind, CropRecipe

BICUBIC = v2.InterpolationMode.BICUBIC


def sample_seed(seed: int, epoch: int, index: int, stream: str = "") -> int:
    """A 63-bit seed that depends on all of (seed, epoch, index).

    A cryptographic hash over an unambiguous text encoding: unlike summing or
    xor-ing, no two different triples map to related seeds. `stream` names another
    independent draw of the same sample (the iBOT masks: "masks"); "" is the crops'.
    """
    key = f"{int(seed)}:{int(epoch)}:{int(index)}{':' + stream if stream else ''}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def normalise() -> v2.Compose:
    """Image (uint8 or float in [0, 1]) -> float32 normalised with the ImageNet statistics."""
    return v2.Compose([
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def _blur_kernel_size(crop_size: int) -> int:
    # Wide enough for the largest sigma, but reflect padding needs the kernel
    # to stay below the crop size, and the size must be odd.
    largest_odd = crop_size if crop_size % 2 else crop_size - 1
    return max(1, min(2 * MAX_BLUR_RADIUS + 1, largest_odd))


def _crop_pipeline(recipe: CropRecipe, size: int, scale: tuple[float, float],
                   kind: CropKind) -> v2.Compose:
    # Crop first so the colour work runs on the small crop, and stay in uint8
    # until the end: it is cheaper, and it is the stream the demo was measured on.
    jitter = recipe.jitter
    steps = [
        v2.RandomResizedCrop(size, scale=scale, ratio=recipe.ratio, interpolation=BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(p=recipe.flip_p),
        v2.RandomApply([v2.ColorJitter(jitter.brightness, jitter.contrast, jitter.saturation,
                                       jitter.hue)], p=jitter.p),
        v2.RandomGrayscale(p=recipe.grey_p),
    ]
    if kind.blur_p > 0:
        blur = v2.GaussianBlur(_blur_kernel_size(size), sigma=recipe.blur_sigma)
        steps.append(blur if kind.blur_p >= 1.0 else v2.RandomApply([blur], p=kind.blur_p))
    if kind.solarize_p > 0:
        # The recipe's threshold is in [0, 1]; these pixels are still uint8.
        threshold = round(recipe.solarize_threshold * 255)
        steps.append(v2.RandomSolarize(threshold=threshold, p=kind.solarize_p))
    steps.append(normalise())
    return v2.Compose(steps)


def _per_crop_chains(recipe: CropRecipe) -> list[v2.Compose]:
    """One transforms.v2 chain per crop position (data.batched_crops=false)."""
    kinds = recipe.kinds()
    return [_crop_pipeline(recipe, group.size, group.scale, kind)
            for group in recipe.groups for kind in kinds[group.start:group.stop]]


class MultiCropAugmentation:
    """Turns one uint8 CHW image into the DINO crop list: global crops first, then local."""

    def __init__(self, recipe: CropRecipe, *, batched: bool) -> None:
        self.recipe = recipe
        if batched:
            self.groups = [CropGroup(recipe, group) for group in recipe.groups]
        else:
            self.chains = _per_crop_chains(recipe)
        self.batched = batched

    @classmethod
    def from_config(cls, data: Any) -> "MultiCropAugmentation":
        """The augmentation a run's `data` settings describe (training, validation loss, bench)."""
        return cls(CropRecipe.from_config(data), batched=data.batched_crops)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise TypeError(f"expected a uint8 CHW image tensor, got {image.dtype} of shape {tuple(image.shape)}")
        if self.batched:
            return [crop for group in self.groups for crop in group(image)]
        return [chain(image) for chain in self.chains]

    def __len__(self) -> int:
        return self.recipe.crops_number


def eval_transform(image_size: int) -> v2.Compose:
    """Resize + center crop (the standard 256/224 ratio) for k-NN evaluation."""
    return v2.Compose([
        v2.Resize(int(image_size * 256 / 224), interpolation=BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        normalise(),
    ])
