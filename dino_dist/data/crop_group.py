"""DINO's photometric augmentations for a group of equal-size crops, applied to all at once.

Ten 96 px local crops cost more in per-call overhead than in arithmetic when each goes
through its own transform chain, and every torchvision uint8 op converts to float and back.
Here the crops of one size are cut (uint8), stacked, turned to float once, and every
photometric step runs on the whole stack with per-crop random parameters:

colour jitter in a random order per crop (as torchvision's ColorJitter), grayscale, Gaussian
blur, solarize and ImageNet normalisation, with the probabilities and ranges of the recipe
(recipe.py, which also says when this path is used).

The math of each step is torchvision's float math (blend formulas, HSV hue shift, solarize
threshold); only the rounding to uint8 between steps is gone. Every random draw comes from
torch's global RNG, so seeding it makes the crops reproducible.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from .recipe import (IMAGENET_MEAN, IMAGENET_STD, MAX_BLUR_RADIUS, ColourJitter, CropGroupSpec,
                     CropRecipe)

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _uniform(n: int, low: float, high: float) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high)


def gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def per_crop(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


# In-place on `x` (a contiguous slice of the batch), factor per crop; each ends clamped to
# [0, 1] as torchvision's float ops do. lerp_(other, 1 - f) is torchvision's blend f*x + (1-f)*other.
def _brightness(x: torch.Tensor, factor: torch.Tensor) -> None:
    x.mul_(per_crop(factor)).clamp_(0, 1)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> None:
    mean = gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    x.lerp_(mean.expand_as(x), per_crop(1 - factor)).clamp_(0, 1)


def _saturation(x: torch.Tensor, factor: torch.Tensor) -> None:
    x.lerp_(gray(x).expand_as(x), per_crop(1 - factor)).clamp_(0, 1)


def _hue_(x: torch.Tensor, shift: torch.Tensor) -> None:
    x.copy_(rotate_hue(x, shift))


def _mod6(x: torch.Tensor) -> torch.Tensor:
    # floor-based: several times faster than torch.remainder on CPU
    return x.sub_(torch.floor(x * (1 / 6)).mul_(6))


def rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns, keeping saturation and value (as adjust_hue).

    Elementwise max/min and torch.where rather than reductions over the channel dim and
    products with boolean masks (each a float conversion): 2x faster on CPU for local crops,
    the same values. A grey pixel (chroma 0) comes out unchanged whatever its hue reads.
    Runs where `x` lives (the device path uses it too): nothing is read on the host.
    """
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    inv_chroma = chroma.clamp_min(1e-12).reciprocal_()
    # Hue in sixths of a turn, by which channel is largest (ties resolve to the first).
    is_r = r == maxc
    is_g = (g == maxc).logical_and_(~is_r)
    hue6 = torch.where(is_r, g - b, torch.where(is_g, (b - r).add_(chroma, alpha=2),
                                                 (r - g).add_(chroma, alpha=4)))
    hue6.mul_(inv_chroma).add_(6 * shift.view(-1, 1, 1))
    # HSV -> RGB in closed form: channel n is v - c * clamp(min(k, 4 - k), 0, 1),
    # k = (n + hue6) mod 6 with n = 5, 3, 1 for red, green, blue.
    sector_offsets = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device)
    k = _mod6(hue6.unsqueeze(-3) + sector_offsets.view(1, 3, 1, 1))
    ramp = torch.minimum(k, k.neg().add_(4)).clamp_(0, 1)
    return ramp.mul_(chroma.unsqueeze(-3)).neg_().add_(maxc.unsqueeze(-3))


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue_)


def colour_jitter(x: torch.Tensor, jitter: ColourJitter) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ColorJitter with `jitter`'s strengths and probability, per crop, in a
    random order per crop.

    The device path (device_augment.colour_jitter) applies the same draws without reading
    anything on the host; this one reads the draws to skip the work: for each of the four slots of the order, the crops are sorted by the op they take in that
    slot, so every op runs once, in place, on a contiguous slice (no scatter back). Returns
    the jittered rows in their new order and, per row, the index of the crop it holds.
    """
    n = x.shape[0]
    applied = torch.rand(n) < jitter.p
    factors = torch.stack([_uniform(n, low, high) for low, high in jitter.ranges()], dim=1)
    order = torch.argsort(torch.rand(n, 4), dim=1)  # one random permutation per crop
    position = torch.arange(n)  # which original crop each row of x holds
    if not applied.any():
        return x, position
    for slot in range(4):
        op_of_row = torch.where(applied[position], order[position, slot], len(_JITTER_OPS))
        op_of_row, rows = torch.sort(op_of_row, stable=True)
        x, position = x.index_select(0, rows), position[rows]
        counts = torch.bincount(op_of_row, minlength=len(_JITTER_OPS) + 1).tolist()
        start = 0
        for op_index, op in enumerate(_JITTER_OPS):
            stop = start + counts[op_index]
            if stop > start:
                op(x[start:stop], factors[position[start:stop], op_index])
            start = stop
    return x, position


def random_grayscale(x: torch.Tensor, probability: float) -> torch.Tensor:
    chosen = (torch.rand(x.shape[0]) < probability).nonzero().flatten()
    if chosen.numel():
        x.index_copy_(0, chosen, gray(x.index_select(0, chosen)).expand(-1, 3, -1, -1))
    return x


def _gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-(offsets / sigmas.view(-1, 1)) ** 2 / 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def random_blur(x: torch.Tensor, probabilities: torch.Tensor, sigma_range: Sequence[float]) -> torch.Tensor:
    """Gaussian blur with sigma ~ U(sigma_range), crop i blurred with probability probabilities[i].

    The kernel reaches 3 sigma of the largest sigma drawn (at most MAX_BLUR_RADIUS), so
    small-sigma batches pay for small kernels; reflect padding as torchvision. The depthwise
    convolutions run channels-last, which is several times faster on CPU for few planes.
    """
    n, channels, height, width = x.shape
    blurred = torch.rand(n) < probabilities
    sigmas = _uniform(n, sigma_range[0], sigma_range[1])
    chosen = blurred.nonzero().flatten()
    radius = min(MAX_BLUR_RADIUS, (min(height, width) - 1) // 2)
    if chosen.numel():
        sigmas = sigmas[chosen]
        radius = min(radius, math.ceil(3 * float(sigmas.max())))
    if not chosen.numel() or radius < 1:
        return x
    kernels = _gaussian_kernels(sigmas, radius).repeat_interleave(channels, dim=0)  # [m*C, K]
    planes = x.index_select(0, chosen).reshape(1, -1, height, width).contiguous(memory_format=torch.channels_last)
    groups = planes.shape[1]
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="reflect"),
                      kernels.view(groups, 1, 1, -1), groups=groups)
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="reflect"),
                      kernels.view(groups, 1, -1, 1), groups=groups)
    x.index_copy_(0, chosen, planes.contiguous().view(-1, channels, height, width))
    return x


def random_solarize(x: torch.Tensor, probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """x -> 1 - x where x >= threshold, crop i with probability probabilities[i] (as solarize)."""
    chosen = (torch.rand(x.shape[0]) < probabilities).nonzero().flatten()
    if chosen.numel():
        picked = x.index_select(0, chosen)
        bright = (picked >= threshold).to(picked.dtype)
        x.index_copy_(0, chosen, picked.addcmul_(bright, 1 - 2 * picked))
    return x


# (x - mean) / std as one multiply and one add
_NORM_SCALE = 1 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
_NORM_SHIFT = -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * _NORM_SCALE


class CropGroup:
    """The crops of one size from one image (`group` of `recipe`), with DINO's photometric steps."""

    def __init__(self, recipe: CropRecipe, group: CropGroupSpec):
        self.recipe, self.size, self.scale = recipe, group.size, tuple(group.scale)
        self.blur_p = recipe.blur_p()[group.start:group.stop]
        self.solarize_p = recipe.solarize_p()[group.start:group.stop]

    def __len__(self) -> int:
        return len(self.blur_p)

    def _cut(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale,
                                                                self.recipe.ratio)
        crop = TF.resized_crop(image, top, left, height, width, [self.size, self.size],
                               interpolation=InterpolationMode.BICUBIC, antialias=True)
        return crop.flip(-1) if torch.rand(1).item() < self.recipe.flip_p else crop

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        recipe = self.recipe
        crops = torch.stack([self._cut(image) for _ in range(len(self))])
        x = crops.to(torch.float32).div_(255)
        # Rows come back from the jitter reordered; later steps draw per row with the
        # probabilities of the crop each row holds, and the list is put back in crop order.
        x, position = colour_jitter(x, recipe.jitter)
        x = random_grayscale(x, recipe.grey_p)
        x = random_blur(x, self.blur_p[position], recipe.blur_sigma)
        x = random_solarize(x, self.solarize_p[position], recipe.solarize_threshold)
        rows = x.mul_(_NORM_SCALE).add_(_NORM_SHIFT).unbind(0)
        crops_in_order = [None] * len(rows)
        for row, crop_index in zip(rows, position.tolist()):
            crops_in_order[crop_index] = row
        return crops_in_order
