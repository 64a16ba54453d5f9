"""The batched crop pipeline (data/crop_group.py) does torchvision's math, crop by crop."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from dino_dist.data import crop_group as cg
from dino_dist.data.recipe import IMAGENET_MEAN, IMAGENET_STD, ColourJitter, CropKind, CropRecipe

JITTER = ColourJitter()


def random_images(n: int = 4, size: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shift", [-0.1, -0.03, 0.0, 0.05, 0.1, 0.5])
def test_hue_matches_torchvision_adjust_hue(shift):
    x = random_images()
    x[0, :, :5, :5] = 0.5  # grey pixels: hue undefined, must come out unchanged
    expected = torch.stack([TF.adjust_hue(image, shift) for image in x])
    assert torch.allclose(cg.rotate_hue(x, torch.full((4,), shift)), expected, atol=1e-5)


@pytest.mark.parametrize("op, reference", [
    (cg._brightness, TF.adjust_brightness),
    (cg._contrast, TF.adjust_contrast),
    (cg._saturation, TF.adjust_saturation),
])
def test_blend_ops_match_torchvision_per_crop_factor(op, reference):
    x = random_images()
    factors = torch.tensor([0.6, 0.9, 1.2, 1.4])
    expected = torch.stack([reference(image, float(f)) for image, f in zip(x, factors)])
    op(x, factors)  # in place
    assert torch.allclose(x, expected, atol=1e-6)


def jitter_reference(x: torch.Tensor, seed: int) -> torch.Tensor:
    """torchvision's ColorJitter applied crop by crop with the same random draws."""
    torch.manual_seed(seed)
    n = x.shape[0]
    applied = torch.rand(n) < 0.8
    factors = torch.stack([torch.empty(n).uniform_(0.6, 1.4), torch.empty(n).uniform_(0.6, 1.4),
                           torch.empty(n).uniform_(0.8, 1.2), torch.empty(n).uniform_(-0.1, 0.1)], 1)
    order = torch.argsort(torch.rand(n, 4), dim=1)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = []
    for i, image in enumerate(x):
        if applied[i]:
            for op_index in order[i].tolist():
                image = ops[op_index](image, float(factors[i, op_index]))
        out.append(image)
    return torch.stack(out)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_colour_jitter_is_torchvision_colorjitter_in_a_random_order_per_crop(seed):
    x = random_images(n=10, seed=seed)
    expected = jitter_reference(x.clone(), seed)
    torch.manual_seed(seed)
    rows, position = cg.colour_jitter(x.clone(), JITTER)
    assert sorted(position.tolist()) == list(range(10))
    assert torch.allclose(rows, expected[position], atol=1e-5)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0])
def test_blur_matches_torchvision_gaussian_blur(sigma):
    x = random_images(n=3, size=24)
    radius = math.ceil(3 * sigma)
    expected = torch.stack([TF.gaussian_blur(image, [2 * radius + 1] * 2, [sigma, sigma]) for image in x])
    blurred = cg.random_blur(x.clone(), torch.ones(3), (sigma, sigma))
    assert torch.allclose(blurred, expected, atol=1e-5)
    untouched = cg.random_blur(x.clone(), torch.zeros(3), (sigma, sigma))
    assert torch.equal(untouched, x)


def test_solarize_matches_torchvision_at_128():
    x, threshold = random_images(), CropRecipe(1, 8, (0.4, 1.0), 1, 8, (0.4, 1.0)).solarize_threshold
    expected = torch.stack([TF.solarize(image, 128 / 255) for image in x])
    assert torch.allclose(cg.random_solarize(x.clone(), torch.ones(4), threshold), expected, atol=1e-6)
    assert torch.equal(cg.random_solarize(x.clone(), torch.zeros(4), threshold), x)


def test_crop_group_returns_crops_in_crop_order_with_their_own_probabilities():
    # On a white image only solarize can make a crop dark (brightness <= 1 keeps >= 0.6),
    # so the one crop with solarize_p = 1 must come back dark and at its own index, whatever
    # order the jitter left the rows in.
    white = torch.full((3, 40, 40), 255, dtype=torch.uint8)
    recipe = CropRecipe(5, 16, (0.4, 1.0), 0, 8, (0.05, 0.4), first_global=CropKind(0.5, 1.0),
                        other_global=CropKind(0.5, 0.0))
    group = cg.CropGroup(recipe, recipe.groups[0])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for seed in range(8):
        torch.manual_seed(seed)
        crops = [crop * std + mean for crop in group(white)]
        assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 5
        assert crops[0].max() <= 0.41
        assert all(crops[i].min() >= 0.59 for i in (1, 2, 3, 4))


def test_crop_group_is_reproducible_under_a_seed():
    image = torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8)
    recipe = CropRecipe(4, 16, (0.2, 1.0), 0, 8, (0.05, 0.4))
    group = cg.CropGroup(recipe, recipe.groups[0])
    torch.manual_seed(5)
    first = group(image)
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(first, group(image)))
