"""The DINO reference multi-crop pipeline (facebookresearch/dino `DataAugmentationDINO`).

PIL transforms composed exactly as the paper's code does, with its PIL loader. It exists only
so the data benchmark can compare the project's pipeline against it in the same run.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL blur with a random radius, applied with probability p (reference `utils.GaussianBlur`)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


def pil_loader(path: str) -> Image.Image:
    """torchvision ImageFolder's default loader, which the reference uses."""
    with open(path, "rb") as handle:
        return Image.open(handle).convert("RGB")


class ReferenceMultiCrop:
    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_crop_size: int = 224, local_crop_size: int = 96):
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([
            transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = transforms.InterpolationMode.BICUBIC
        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(global_crop_size, scale=tuple(global_crops_scale), interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(1.0), normalize])
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(global_crop_size, scale=tuple(global_crops_scale), interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(0.1), Solarization(0.2), normalize])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(local_crop_size, scale=tuple(local_crops_scale), interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(p=0.5), normalize])

    def __call__(self, image: Image.Image) -> list:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return crops
