"""One recipe for every augmentation path: a value changed in CropRecipe changes the crops of
the per-crop, the batched and the device path alike, and the config's defaults are DINO's."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dino_dist.config import DataConfig
from dino_dist.data import CropRecipe, MultiCropAugmentation
from dino_dist.data.crop_params import CropParamSampler
from dino_dist.data.device_augment import augment_batch, collate_decoded
from dino_dist.data.recipe import IMAGENET_MEAN, IMAGENET_STD, ColourJitter, CropKind

PATHS = ("per_crop", "batched", "device")
# Two global and three local crops, without jitter or solarize: a uniform image keeps its
# colour unless a test's recipe says otherwise (flips, crops and blur cannot change it).
QUIET = CropRecipe(2, 16, (0.4, 1.0), 3, 8, (0.2, 0.5), jitter=ColourJitter(p=0.0),
                   other_global=CropKind(blur_p=0.1, solarize_p=0.0))


def crops_of(path: str, recipe: CropRecipe, image: torch.Tensor) -> list[torch.Tensor]:
    """Each crop of `image` made by `path`, back in [0, 1] pixel units."""
    if path == "device":
        sample = CropParamSampler(recipe)(image)
        crops = [c[0] for c in augment_batch(collate_decoded([(sample, 0, 0)], recipe)[0])]
    else:
        crops = MultiCropAugmentation(recipe, batched=path == "batched")(image)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return [crop * std + mean for crop in crops]


def uniform_image(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 40, 40).contiguous()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threshold, inverted", [(0.3, True), (0.5, False)])
def test_every_path_solarizes_at_the_recipes_threshold_in_0_1_units(path, threshold, inverted):
    # Grey level 100 is 0.39 in [0, 1] units: above 0.3, below 0.5. A path that kept its own
    # 128/255 misses the first case; one that read 0.5 as uint8 units misses the second.
    always = CropKind(blur_p=0.0, solarize_p=1.0)
    recipe = replace(QUIET, solarize_threshold=threshold, first_global=always,
                     other_global=always, local=always)
    expected = 1 - 100 / 255 if inverted else 100 / 255
    torch.manual_seed(0)
    for crop in crops_of(path, recipe, uniform_image((100, 100, 100))):
        assert torch.allclose(crop, torch.full_like(crop, expected), atol=1e-4)


def is_grey(crop: torch.Tensor) -> bool:
    return bool((crop[0] - crop[1]).abs().max() < 1e-4 and (crop[1] - crop[2]).abs().max() < 1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_every_path_reads_grey_and_jitter_from_the_recipe(path):
    colour = uniform_image((200, 60, 120))
    original = torch.tensor([200, 60, 120]).view(3, 1, 1) / 255
    for seed in range(3):
        torch.manual_seed(seed)
        assert all(is_grey(c) for c in crops_of(path, replace(QUIET, grey_p=1.0), colour))
        torch.manual_seed(seed)
        crops = crops_of(path, replace(QUIET, grey_p=0.0), colour)
        assert all(torch.allclose(c, original.expand_as(c), atol=1e-4) for c in crops)
    # Jitter always on, but with zero strengths: every op is the identity.
    still = replace(QUIET, grey_p=0.0, jitter=ColourJitter(0.0, 0.0, 0.0, 0.0, p=1.0))
    torch.manual_seed(0)
    crops = crops_of(path, still, colour)
    assert all(torch.allclose(c, original.expand_as(c), atol=1e-4) for c in crops)
    torch.manual_seed(0)
    jittered = crops_of(path, replace(still, jitter=ColourJitter(brightness=0.4, p=1.0)), colour)
    assert sum(not torch.allclose(c, original.expand_as(c), atol=1e-2) for c in jittered) >= 3


def test_config_defaults_are_the_dino_recipe():
    paper = CropRecipe(2, 224, (0.4, 1.0), 10, 96, (0.05, 0.4))
    assert CropRecipe.from_config(DataConfig()) == paper
    assert paper.blur_sigma == (0.1, 2.0) and paper.solarize_threshold == 128 / 255
    assert [kind.blur_p for kind in paper.kinds()] == [1.0, 0.1] + [0.5] * 10
    assert [kind.solarize_p for kind in paper.kinds()] == [0.0, 0.2] + [0.0] * 10
    assert (paper.flip_p, paper.grey_p, paper.ratio) == (0.5, 0.2, (3 / 4, 4 / 3))
    assert paper.jitter.ranges() == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    assert paper.jitter.p == 0.8
