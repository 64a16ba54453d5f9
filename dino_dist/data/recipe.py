"""DINO's multi-crop recipe, stated once, and the three paths that apply it.

`CropRecipe` holds every probability, range and threshold of the augmentation. The crop
counts, sizes, scales and blur sigma come from the run's `data` settings; the rest is the
DINO paper's recipe, fixed here. Pixel values are floats in [0, 1] wherever the recipe
names one, so the solarize threshold is 128/255 (the per-crop path, which works on uint8,
scales it by 255 where it builds its transform).

Which path makes the crops, and why:
- `data.augment_on=gpu`: loader processes only decode each image and draw its crops' random
  parameters (crop_params.py); the training device cuts and augments every crop of a
  micro-batch at once (device_augment.py). For GPU runs whose loader CPUs cannot keep up
  with the step. `data.batched_crops` does not apply.
- `data.augment_on=cpu` (default) and `data.batched_crops=true` (default): each loader
  process augments the crops of one size as one stack (crop_group.py). Per loader worker
  (one thread) it makes 1.4x the images/s of the per-crop path on small crops (2x32 + 2x16
  px, 2x96 + 4x48 px) and 2.1x on the paper's 2x224 + 10x96, so it is the CPU default.
- `data.augment_on=cpu` and `data.batched_crops=false`: one torchvision transforms.v2 chain
  per crop (augment.py), the slowest path. It stays because the demo's k-NN figures were
  measured on its random stream.
All three apply the same recipe but draw their random numbers in different orders, so one
seed gives different, equally distributed crops on each; tests/test_device_augment.py
compares the paths' outputs in distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Blur kernels reach 3 sigma of the paper's largest sigma (2 px): 13 taps, as torchvision's.
MAX_BLUR_RADIUS = 6


@dataclass(frozen=True)
class ColourJitter:
    """torchvision's ColorJitter strengths, applied with probability `p`, the four ops in a
    random order per crop (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # in turns of the colour wheel
    p: float = 0.8

    def ranges(self) -> tuple[tuple[float, float], ...]:
        """Each op's factor range, in op order: 1 +- strength for the blends, +- hue for hue."""
        return ((1 - self.brightness, 1 + self.brightness),
                (1 - self.contrast, 1 + self.contrast),
                (1 - self.saturation, 1 + self.saturation),
                (-self.hue, self.hue))


@dataclass(frozen=True)
class CropKind:
    """The probabilities that differ between kinds of crop."""
    blur_p: float
    solarize_p: float


@dataclass(frozen=True)
class CropGroupSpec:
    """The crops of one output size: positions start..stop-1 of the crop list."""
    start: int
    stop: int
    size: int
    scale: tuple[float, float]


@dataclass(frozen=True)
class CropRecipe:
    """Every count, size, probability, range and threshold of a run's crops."""
    global_crops_number: int
    global_crop_size: int
    global_crops_scale: tuple[float, float]
    local_crops_number: int
    local_crop_size: int
    local_crops_scale: tuple[float, float]
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels; the paper's, for 224 px crops
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
    flip_p: float = 0.5
    jitter: ColourJitter = ColourJitter()
    grey_p: float = 0.2
    # The asymmetry is DINO's: global crop 1 is always blurred; crop 2 (and any further one)
    # is rarely blurred but may be solarized; the locals are blurred half the time.
    first_global: CropKind = CropKind(blur_p=1.0, solarize_p=0.0)
    other_global: CropKind = CropKind(blur_p=0.1, solarize_p=0.2)
    local: CropKind = CropKind(blur_p=0.5, solarize_p=0.0)
    solarize_threshold: float = 128 / 255  # pixels at or above it are inverted

    @classmethod
    def from_config(cls, data: Any) -> "CropRecipe":
        """The recipe a run's `data` settings describe (training, validation loss, bench)."""
        return cls(data.global_crops_number, data.global_crop_size,
                   tuple(data.global_crops_scale), data.local_crops_number,
                   data.local_crop_size, tuple(data.local_crops_scale), tuple(data.blur_sigma))

    @property
    def crops_number(self) -> int:
        return self.global_crops_number + self.local_crops_number

    @property
    def groups(self) -> list[CropGroupSpec]:
        g = self.global_crops_number
        groups = [CropGroupSpec(0, g, self.global_crop_size, self.global_crops_scale)]
        if self.local_crops_number:
            groups.append(CropGroupSpec(g, self.crops_number, self.local_crop_size,
                                        self.local_crops_scale))
        return groups

    def kinds(self) -> list[CropKind]:
        """Per crop position, global crops first."""
        return ([self.first_global] + [self.other_global] * (self.global_crops_number - 1)
                + [self.local] * self.local_crops_number)

    def blur_p(self) -> torch.Tensor:
        return torch.tensor([kind.blur_p for kind in self.kinds()])

    def solarize_p(self) -> torch.Tensor:
        return torch.tensor([kind.solarize_p for kind in self.kinds()])

    def output_sizes(self) -> torch.Tensor:
        return torch.tensor([self.global_crop_size] * self.global_crops_number
                            + [self.local_crop_size] * self.local_crops_number, dtype=torch.float64)
