"""DINO's multi-crop augmentation of a whole micro-batch on the training device (`data.augment_on=gpu`).

The loader sends a DecodedBatch: the batch's uint8 images on one canvas plus every crop's
random parameters (crop_params.py). Here, for each crop size, all crops of the micro-batch
are cut and resized in one roi_align call, then flip, colour jitter, grayscale, blur,
solarize and ImageNet normalisation run on the whole stack with per-crop parameters.

Nothing here reads a device value on the host (no .item(), no boolean-mask indexing, no
data-dependent shapes): per-crop choices are torch.where and arithmetic gating, so a CUDA
step queues all of it without waiting. Crops not taking an op pass through it exactly
(a blend factor of 1, a delta blur kernel, a where that keeps them). The math is that of
crop_group.py (torchvision's float formulas), laid out for the device; every probability and
range is the recipe's (recipe.py, which also says when this path is used).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .batch import collate_masks
from .crop_group import GRAY_WEIGHTS, per_crop, rotate_hue
from .crop_params import (BLUR_ON, BRIGHTNESS, COLUMNS, CONTRAST_OP, FLIP, GRAY, HEIGHT, HUE,
                          HUE_OP, JITTER_ON, LEFT, ORDER, SATURATION, SATURATION_OP, SIGMA,
                          SOLARIZE_ON, TOP, WIDTH, DecodedSample)
from .recipe import IMAGENET_MEAN, IMAGENET_STD, MAX_BLUR_RADIUS, CropRecipe


@dataclass(frozen=True, eq=False)  # eq would compare tensors
class DecodedBatch:
    """A micro-batch before augmentation.

    `images`: a uint8 canvas [B, 3, H, W] holding image i at [i, :, :h_i, :w_i], one pixel
    taller and wider than the largest image; the rest repeats each image's last row and
    column. So every image has at least one repeated row and column past its edge, and
    resampling at the edge reads the same values whatever else is in the batch (a sample's
    crops are bit-identical in any batch). `params` [B, crops, COLUMNS]: the crops' random
    draws. `sizes` [B, 2]: the images' (h, w), kept on the host.
    """
    images: torch.Tensor
    params: torch.Tensor
    sizes: torch.Tensor
    recipe: CropRecipe

    def pin_memory(self) -> "DecodedBatch":
        """Called by DataLoader(pin_memory=True) so the copy to the GPU can run asynchronously."""
        return replace(self, images=self.images.pin_memory(), params=self.params.pin_memory())

    def to(self, device: torch.device | str) -> "DecodedBatch":
        return replace(self, images=self.images.to(device, non_blocking=True),
                       params=self.params.to(device, non_blocking=True))

    def __len__(self) -> int:
        return self.images.shape[0]


def pad_to_canvas(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 images of any sizes -> one [B, 3, H+1, W+1] canvas, edges repeated (DecodedBatch)."""
    height = max(image.shape[-2] for image in images) + 1
    width = max(image.shape[-1] for image in images) + 1
    canvas = torch.empty(len(images), 3, height, width, dtype=torch.uint8)
    for slot, image in zip(canvas, images):
        h, w = image.shape[-2:]
        slot[:, :h, :w] = image
        slot[:, :h, w:] = image[:, :, w - 1:]
        slot[:, h:, :] = slot[:, h - 1:h, :]
    return canvas


def collate_decoded(batch: list[tuple], recipe: CropRecipe) -> tuple:
    """Samples of CropParamSampler -> (DecodedBatch, labels, skipped[, masks]), the loader's
    batch (masks: iBOT, see loader.collate_masks)."""
    samples, labels, skipped = list(zip(*batch))[:3]
    images = [sample.image for sample in samples]
    sizes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.long)
    params = torch.stack([sample.params for sample in samples])
    decoded = DecodedBatch(pad_to_canvas(images), params, sizes, recipe)
    return (decoded, torch.tensor(labels, dtype=torch.long), sum(skipped)) + collate_masks(batch)


# ---------------------------------------------------------------- geometry

def cut_and_resize(canvas: torch.Tensor, params: torch.Tensor, batch_size: int,
                   size: int) -> torch.Tensor:
    """Crop rows (position-major: row = position * B + sample) -> [rows, 3, size, size] in [0, 1].

    roi_align with an adaptive grid averages ceil(box / size) x ceil(box / size) bilinear
    samples per output pixel: an area (box) filter when shrinking, so no aliasing, and plain
    bilinear when enlarging; one call for every crop of this size in the micro-batch, and
    its cost follows the output, not the image.
    """
    rows = params.shape[0]
    sample = (torch.arange(rows, device=params.device) % batch_size).to(params.dtype)
    top, left = params[:, TOP], params[:, LEFT]
    boxes = torch.stack([sample, left, top, left + params[:, WIDTH], top + params[:, HEIGHT]], dim=1)
    crops = roi_align(canvas, boxes, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    crops = crops.div_(255).clamp_(0, 1)
    return torch.where(per_crop(params[:, FLIP] > 0.5), crops.flip(-1), crops)


# ---------------------------------------------------------------- colour

def gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale weights, as one product and one channel sum [rows, 1, H, W]."""
    return (x * _constant(GRAY_WEIGHTS, x.device)).sum(dim=1, keepdim=True)


def _blend_coefficients(params: torch.Tensor, ops: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Each crop's blend steps as x -> a * x + b * grey(x) + c * mean grey: [rows, steps, 3].

    Brightness, contrast and saturation are all torchvision's blend f * x + (1 - f) * target
    with target 0, the mean grey level or the grey image; so one formula with per-crop
    (a, b, c) = (f, 0, 0), (f, 0, 1 - f) or (f, 1 - f, 0) runs whichever op a crop has in
    that step, and an inactive step gets (1, 0, 0), which returns x exactly. Computed for all
    steps at once, so each step costs a few whole-stack ops instead of one gate per op.
    """
    factors = params[:, BRIGHTNESS:SATURATION + 1].gather(1, ops)
    a = torch.where(active, factors, torch.ones_like(factors))
    rest = 1 - a
    zeros = torch.zeros_like(a)
    b = torch.where(ops == SATURATION_OP, rest, zeros)
    c = torch.where(ops == CONTRAST_OP, rest, zeros)
    return torch.stack((a, b, c), dim=-1)


def _blend(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """One blend step, (a, b, c) [rows, 3] per crop (_blend_coefficients), clamped as
    torchvision's float ops. (a*x + 0*g) + 0*m is a*x exactly, so each op's rounding is that
    of its own formula."""
    a, b, c = (per_crop(values) for values in coefficients.unbind(-1))
    grey = gray(x)
    mean = grey.mean(dim=(-3, -2, -1), keepdim=True)
    return (x * a).addcmul_(grey, b).addcmul_(mean, c).clamp_(0, 1)


def colour_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter with the factors, order and on/off drawn in `params` (from
    the recipe's jitter, crop_params.py), in each crop's own order of the four ops.

    crop_group.colour_jitter draws the same and skips the crops and ops not drawn; this one
    reads nothing on the host, so it gates instead. Hue, the costly op, runs once over the
    stack: each crop's three blends are split into those before its hue and those after,
    three blend steps on each side (_blend_coefficients), inactive ones exact pass-throughs.
    """
    applied = (params[:, JITTER_ON] > 0.5).unsqueeze(1)
    order = params[:, ORDER:ORDER + 4].long()
    hue_slot = (order == HUE_OP).to(torch.uint8).argmax(dim=1, keepdim=True)
    # The j-th blend of a crop: the op in slot j, or in slot j + 1 once hue is passed.
    step = torch.arange(3, device=params.device).unsqueeze(0)
    before_hue = step < hue_slot
    blends = torch.where(before_hue, order[:, :3], order[:, 1:])
    ops = torch.cat((blends, blends), dim=1)  # steps 0-2 before the hue, 3-5 after
    active = applied & torch.cat((before_hue, ~before_hue), dim=1)
    coefficients = _blend_coefficients(params, ops, active)
    for j in range(3):
        x = _blend(x, coefficients[:, j])
    x = torch.where(per_crop(applied), rotate_hue(x, params[:, HUE]), x)
    for j in range(3, 6):
        x = _blend(x, coefficients[:, j])
    return x


def grayscale(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return torch.where(per_crop(params[:, GRAY] > 0.5), gray(x).expand_as(x), x)


def blur_radius(size: int, sigma_range: tuple[float, float]) -> int:
    """Reaches 3 sigma of the largest sigma (as torchvision's 13 taps for sigma 2), and stays
    below the crop size for reflect padding; fixed per run, so no shape depends on a draw."""
    return max(0, min(MAX_BLUR_RADIUS, math.ceil(3 * sigma_range[1]), (size - 1) // 2))


def gaussian_blur(x: torch.Tensor, params: torch.Tensor, sigma_range: tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur with each crop's sigma; crops not drawn for blur get a delta
    kernel (an exact pass-through). One grouped (depthwise) convolution per direction."""
    rows, channels, height, width = x.shape
    radius = blur_radius(min(height, width), sigma_range)
    if radius == 0:
        return x
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sigma = params[:, SIGMA].unsqueeze(1)
    kernels = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    delta = (taps == 0).to(x.dtype).expand_as(kernels)
    kernels = torch.where(params[:, BLUR_ON].unsqueeze(1) > 0.5, kernels, delta)
    kernels = kernels.repeat_interleave(channels, dim=0)  # one per plane: [rows*C, K]
    planes = x.reshape(1, rows * channels, height, width)
    groups = rows * channels
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="reflect"),
                      kernels.view(groups, 1, 1, -1), groups=groups)
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="reflect"),
                      kernels.view(groups, 1, -1, 1), groups=groups)
    return planes.view(rows, channels, height, width)


def solarize(x: torch.Tensor, params: torch.Tensor, threshold: float) -> torch.Tensor:
    flip_bright = per_crop(params[:, SOLARIZE_ON] > 0.5) & (x >= threshold)
    return torch.where(flip_bright, 1 - x, x)


def normalise_(x: torch.Tensor) -> torch.Tensor:
    return x.sub_(_constant(IMAGENET_MEAN, x.device)).div_(_constant(IMAGENET_STD, x.device))


@functools.cache
def _constant(per_channel: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A per-channel constant [1, 3, 1, 1] on `device`, copied there once per process: a
    copy per call would make the host wait for the device's queue."""
    return torch.tensor(per_channel).view(1, 3, 1, 1).to(device)


# ---------------------------------------------------------------- the whole batch

def augment_batch(batch: DecodedBatch) -> list[torch.Tensor]:
    """Every crop of the micro-batch, where its tensors live: global crops first, each
    [B, 3, size, size] float32 normalised, as the CPU path's collate_multicrop gives."""
    recipe, batch_size = batch.recipe, len(batch)
    canvas = batch.images.to(torch.float32)
    crops: list[torch.Tensor] = []
    for group in recipe.groups:
        count = group.stop - group.start
        # Position-major rows, so each position's crops come out as one contiguous [B, ...].
        params = batch.params[:, group.start:group.stop].transpose(0, 1).reshape(-1, COLUMNS)
        x = cut_and_resize(canvas, params, batch_size, group.size)
        x = colour_jitter(x, params)
        x = grayscale(x, params)
        x = gaussian_blur(x, params, recipe.blur_sigma)
        x = normalise_(solarize(x, params, recipe.solarize_threshold))
        crops.extend(x.view(count, batch_size, 3, group.size, group.size).unbind(0))
    return crops


def crops_on_device(crops: list[torch.Tensor] | DecodedBatch,
                    device: torch.device | str) -> list[torch.Tensor]:
    """The training step's crops on `device`: moved (augment_on=cpu) or made there (gpu)."""
    if isinstance(crops, DecodedBatch):
        return augment_batch(crops.to(device))
    return [c.to(device, non_blocking=True) for c in crops]
