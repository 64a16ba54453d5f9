"""The random draws of DINO's multi-crop recipe, made in the loader for `data.augment_on=gpu`.

A loader process decodes an image and draws, from the sample's private seed, every random
choice its crops need: the crop box (RandomResizedCrop's rule), flip, colour jitter (whether,
the four factors and their order), grayscale, blur (whether, sigma) and solarize. One row of
COLUMNS floats per crop, global crops first; device_augment.py turns the rows into pixels.
An image far larger than its crops need is shrunk here first (shrink_to_need). Every
probability and range is the recipe's (recipe.py, which also says when this path is used).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torchvision.transforms.v2 import functional as TF

from .recipe import CropRecipe

# Columns of a crop's parameter row. The box is (top, left, height, width) in pixels of the
# image the loader sends; the flags hold 0 or 1; ORDER.. hold the jitter ops in the order
# they apply (0 brightness, 1 contrast, 2 saturation, 3 hue), as ColorJitter's randperm.
TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER_ON = range(6)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(6, 10)
ORDER = 10  # four columns: 10..13
GRAY, BLUR_ON, SIGMA, SOLARIZE_ON = range(14, 18)
COLUMNS = 18
# Jitter ops as ORDER names them; op i's factor is in column BRIGHTNESS + i.
BRIGHTNESS_OP, CONTRAST_OP, SATURATION_OP, HUE_OP = range(4)
CROP_ATTEMPTS = 10  # RandomResizedCrop's tries before its centre-crop fallback
# An image whose every crop box is over SHRINK_ABOVE times its output size is shrunk in the
# loader until the smallest is SHRINK_TO times: the device never gets many pixels no crop uses.
SHRINK_ABOVE, SHRINK_TO = 4.0, 2.0


def _fallback_box(height: int, width: int,
                  ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's centre crop when no attempt fits: the whole image, ratio clamped."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_boxes(height: int, width: int, count: int, scale: Sequence[float],
               ratio: tuple[float, float]) -> torch.Tensor:
    """`count` RandomResizedCrop boxes [count, 4] (top, left, height, width), all tries at once.

    The same rule as torchvision's get_params: area fraction ~ U(scale), log aspect ratio
    ~ U(log ratio), the first of 10 tries that fits, else the centre-crop fallback.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    target = torch.empty(count, CROP_ATTEMPTS, dtype=torch.float64).uniform_(*scale) * area
    aspect = torch.empty(count, CROP_ATTEMPTS, dtype=torch.float64).uniform_(*log_ratio).exp_()
    w = torch.sqrt(target * aspect).round_()
    h = torch.sqrt(target / aspect).round_()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first_fit = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    top_u, left_u = torch.rand(2, count, dtype=torch.float64)
    f_top, f_left, f_h, f_w = _fallback_box(height, width, ratio)
    h = torch.where(found, h.gather(1, first_fit).squeeze(1), float(f_h))
    w = torch.where(found, w.gather(1, first_fit).squeeze(1), float(f_w))
    # randint(0, n - size + 1) of get_params; the clamp guards u * n rounding up to n.
    top = torch.minimum((top_u * (height - h + 1)).floor_(), height - h)
    left = torch.minimum((left_u * (width - w + 1)).floor_(), width - w)
    top = torch.where(found, top, float(f_top))
    left = torch.where(found, left, float(f_left))
    return torch.stack([top, left, h, w], dim=1)


def draw_crop_params(height: int, width: int, recipe: CropRecipe) -> torch.Tensor:
    """Every random choice of one image's crops: [crops_number, COLUMNS] float32."""
    n = recipe.crops_number
    params = torch.zeros(n, COLUMNS, dtype=torch.float64)
    for group in recipe.groups:
        params[group.start:group.stop, TOP:WIDTH + 1] = draw_boxes(
            height, width, group.stop - group.start, group.scale, recipe.ratio)
    params[:, FLIP] = torch.rand(n) < recipe.flip_p
    params[:, JITTER_ON] = torch.rand(n) < recipe.jitter.p
    for op, (low, high) in enumerate(recipe.jitter.ranges()):
        params[:, BRIGHTNESS + op].uniform_(low, high)
    params[:, ORDER:ORDER + 4] = torch.argsort(torch.rand(n, 4), dim=1)
    params[:, GRAY] = torch.rand(n) < recipe.grey_p
    params[:, BLUR_ON] = torch.rand(n) < recipe.blur_p()
    params[:, SIGMA].uniform_(*recipe.blur_sigma)
    params[:, SOLARIZE_ON] = torch.rand(n) < recipe.solarize_p()
    return params.to(torch.float32)


def shrink_to_need(image: torch.Tensor, params: torch.Tensor,
                   recipe: CropRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Downscale an image far larger than its crops need, and its boxes with it.

    A batch is padded to its largest image, so one 4000 px photo would blow up the whole
    batch's transfer and device memory; after this, every crop box is still at least
    SHRINK_TO times its output size, so the crops lose nothing visible.
    """
    boxes = params[:, TOP:WIDTH + 1].double()
    spare = float((torch.minimum(boxes[:, 2], boxes[:, 3]) / recipe.output_sizes()).min())
    if spare <= SHRINK_ABOVE:
        return image, params
    factor = spare / SHRINK_TO
    height, width = image.shape[-2:]
    new_height, new_width = max(1, round(height / factor)), max(1, round(width / factor))
    image = TF.resize(image, [new_height, new_width], antialias=True)
    y_scale, x_scale = new_height / height, new_width / width
    params = params.clone()
    params[:, [TOP, HEIGHT]] *= y_scale
    params[:, [LEFT, WIDTH]] *= x_scale
    return image, params


class DecodedSample(NamedTuple):
    """What a loader process hands on for one image: its pixels and its crops' parameters."""
    image: torch.Tensor  # uint8 [3, H, W]
    params: torch.Tensor  # float32 [crops_number, COLUMNS]


class CropParamSampler:
    """The loader-side step of the gpu path: uint8 image -> DecodedSample.

    Draws from torch's global RNG, which MultiCropDataset seeds per sample.
    """

    def __init__(self, recipe: CropRecipe) -> None:
        self.recipe = recipe

    @classmethod
    def from_config(cls, data: Any) -> "CropParamSampler":
        return cls(CropRecipe.from_config(data))

    def __call__(self, image: torch.Tensor) -> DecodedSample:
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise TypeError(f"expected a uint8 CHW image tensor, got {image.dtype} "
                            f"of shape {tuple(image.shape)}")
        params = draw_crop_params(image.shape[-2], image.shape[-1], self.recipe)
        return DecodedSample(*shrink_to_need(image, params, self.recipe))

    def __len__(self) -> int:
        return self.recipe.crops_number
