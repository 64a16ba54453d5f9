"""Frozen-backbone features for the linear probe, extracted once per checkpoint and cached.

The backbone never changes, so its forward passes are paid once: training images as
`train_views` fixed random-resized-crop + flip views (view v of image i is drawn from a seed
of (seed, v, i), so any rank or loader worker computes the same view), or as one centre crop
with `train_views=0`; validation images as one resize + centre crop. Extraction is sharded
over ranks and gathered on every rank.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.transforms import v2

from dino_dist.checkpoint.files import atomic_write
from dino_dist.data import LabelledImageDataset, eval_transform, sample_seed
from dino_dist.data.crop_group import IMAGENET_MEAN, IMAGENET_STD
from dino_dist.distributed.collectives import broadcast_object
from dino_dist.distributed.env import DistEnv
from dino_dist.errors import ConfigError
from dino_dist.eval.knn import extract_features
from dino_dist.models import VisionTransformer


@dataclass(frozen=True)
class FeatureSettings:
    n_last_blocks: int | None  # CLS tokens of the last n blocks, concatenated (ViT only);
                               # None: the architecture's default
    avgpool: bool       # also the mean patch token of the last block (ViT only)
    image_size: int | None      # None: the checkpoint's eval.image_size
    train_views: int    # augmented views cached per training image; 0 = centre crops
    seed: int


def default_n_last_blocks(arch: str) -> int:
    # DINO's eval_linear.py: 4 blocks for ViT-S and smaller, 1 (with avgpool) for ViT-B.
    return 1 if arch == "vit_base" else 4


def train_transform(image_size: int) -> v2.Compose:
    """DINO's linear-probe training augmentation: random-resized crop and flip."""
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])


def transforms(settings: FeatureSettings) -> tuple[v2.Compose, v2.Compose]:
    """(training, validation) image transforms: augmented training views when
    `train_views` > 0, else both a resize + centre crop."""
    val = eval_transform(settings.image_size)
    return (train_transform(settings.image_size) if settings.train_views > 0 else val), val


def feature_function(backbone: nn.Module, settings: FeatureSettings) -> Callable:
    """Images -> probe features: ViT CLS tokens of the last blocks (+ mean patch token);
    a ResNet's own output, its pooled features."""
    backbone.eval()  # frozen: BatchNorm statistics of the checkpoint, not of the batch
    if not isinstance(backbone, VisionTransformer):
        return backbone
    if not 1 <= settings.n_last_blocks <= len(backbone.blocks):
        raise ConfigError(f"--n-last-blocks {settings.n_last_blocks} does not fit a ViT of "
                          f"{len(backbone.blocks)} blocks: pick 1 to {len(backbone.blocks)}")

    def features(images: torch.Tensor) -> torch.Tensor:
        blocks = backbone.get_intermediate_layers(images, settings.n_last_blocks)
        parts = [tokens[:, 0] for tokens in blocks]
        if settings.avgpool:
            # The patches only: registers, like the CLS token, come before them.
            parts.append(blocks[-1][:, backbone.num_prefix_tokens:].mean(dim=1))
        return torch.cat(parts, dim=1)
    return features


class SeededViews:
    """A labelled folder under a random transform drawn from a seed of (seed, view, index)."""

    def __init__(self, images: LabelledImageDataset, seed: int, view: int) -> None:
        self.images, self.seed, self.view = images, seed, view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        caller_state = torch.get_rng_state()  # restored: the caller's randomness is untouched
        torch.random.default_generator.manual_seed(sample_seed(self.seed, self.view, index))
        try:
            return self.images[index]
        finally:
            torch.set_rng_state(caller_state)


def cache_path(output_dir: Path, checkpoint: Path, train_images: object, val_images: object,
               settings: FeatureSettings) -> Path:
    """The cache's name: a hash of the checkpoint (path, size, mtime of each file), both
    image sets and the feature settings, so any change of them extracts afresh."""
    inside = checkpoint.rglob("*") if checkpoint.is_dir() else [checkpoint]
    files = sorted(p for p in inside if p.is_file())
    identity = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = json.dumps([identity, train_images, val_images, asdict(settings)])
    return output_dir / f"features_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def cached_features(path: Path, features: Callable, train_set: LabelledImageDataset,
                    val_set: LabelledImageDataset, settings: FeatureSettings, env: DistEnv,
                    batch_size: int, num_workers: int) -> dict[str, torch.Tensor]:
    """{"train": [views, N, D], "train_labels", "val": [M, D], "val_labels"}, read from the
    cache when it is there (rank 0 decides, so all ranks agree), else extracted and cached.
    Both datasets come with their transforms (see `transforms`); features are not
    L2-normalised: DINO's linear probe reads the raw tokens."""
    if broadcast_object(path.is_file()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    val, val_labels = extract_features(features, val_set, env, batch_size, num_workers)
    views = [extract_features(features, SeededViews(train_set, settings.seed, view), env,
                              batch_size, num_workers)
             for view in range(max(settings.train_views, 1))]
    result = {"train": torch.stack([f for f, _ in views]), "train_labels": views[0][1],
              "val": val, "val_labels": val_labels}
    if env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(result, f))
    return result
