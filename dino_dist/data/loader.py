"""The training DataLoader: multi-crop dataset + resumable sharded sampler."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .augment import MultiCropAugmentation
from .batch import collate_masks
from .crop_params import CropParamSampler
from .demo import ensure_demo_dataset
from .device_augment import collate_decoded
from .datasets import MultiCropDataset, open_images
from .folder import DataError
from .images import ImageSet
from .order import GlobalOrder, ShardWindowOrder
from .recipe import CropRecipe
from .sampler import ShardedEpochSampler
from .shard_images import ShardImages

DEMO = "demo"


def _demo_root(cfg: Any) -> Path:
    # ensure_demo_dataset is race-safe, so several ranks may call it at once.
    return ensure_demo_dataset(cfg.demo_dir or None)


def open_training_images(cfg: Any) -> ImageSet:
    """The training images; a bad data.path (no images, a missing shard, no or a stale index)
    fails here, before the first step."""
    if cfg.path == DEMO:
        return open_images(_demo_root(cfg) / "train")
    path = cfg.path if "://" in cfg.path else str(Path(cfg.path).expanduser())
    images = open_images(path, read_threads=cfg.read_threads, cache_dir=cfg.index_cache or None,
                         retry_s=cfg.read_retry_s)
    if cfg.order == "shard_windows" and not isinstance(images, ShardImages):
        raise DataError(f"data.order=shard_windows needs a shard set, and data.path '{cfg.path}' is a "
                        "folder of images: set data.order=random, or write shards with dino-shard")
    return images


def resolve_data_root(cfg: Any) -> str:
    """What data.path names, checked (see open_training_images): run before any process starts."""
    return str(open_training_images(cfg).root)


def epoch_sampler(cfg: Any, images: ImageSet, world_size: int, rank: int, seed: int) -> ShardedEpochSampler:
    """Folders keep their stored permutation (the order every earlier run and checkpoint used);
    shard sets compute theirs on demand (data.order)."""
    order = None
    if isinstance(images, ShardImages):
        order = (ShardWindowOrder(images.shards.shard_sizes, cfg.window_shards, seed)
                 if cfg.order == "shard_windows" else GlobalOrder(len(images), seed))
    return ShardedEpochSampler(len(images), world_size, rank, seed, order=order)


def demo_val_root(cfg: Any) -> Path:
    """The demo dataset's validation split (an ImageFolder tree)."""
    return _demo_root(cfg) / "val"


def collate_multicrop(batch: list[tuple]) -> tuple:
    """Stack samples into one [B, C, H, W] tensor per crop position, plus labels and skip
    count, and the iBOT masks when the samples carry them (collate_masks)."""
    crops_per_sample, labels, skipped = list(zip(*batch))[:3]
    crops = [torch.stack(position) for position in zip(*crops_per_sample)]
    return (crops, torch.tensor(labels, dtype=torch.long), sum(skipped)) + collate_masks(batch)


def loader_transform(cfg: Any) -> Callable[[torch.Tensor], Any]:
    """What a loader process does to each decoded image: all crops (cpu), or only draw
    their parameters, the crops being made on the training device (gpu); recipe.py says
    which path serves when."""
    if cfg.augment_on == "gpu":
        return CropParamSampler.from_config(cfg)
    return MultiCropAugmentation.from_config(cfg)


def loader_collate(cfg: Any) -> Callable[[list], tuple[Any, torch.Tensor, int]]:
    if cfg.augment_on == "gpu":
        return functools.partial(collate_decoded, recipe=CropRecipe.from_config(cfg))
    return collate_multicrop


def build_train_loader(
    cfg: Any, batch_size: int, rank: int, world_size: int, seed: int, pin_memory: bool = False,
    masking: Callable[[int], torch.Tensor] | None = None,
) -> tuple[DataLoader, ShardedEpochSampler, MultiCropDataset]:
    """DataLoader yielding (crops, labels, skipped[, masks]) batches of `batch_size` for this
    rank; masks (iBOT) when `masking` is given (see MultiCropDataset, split_batch).

    crops: a list of [B, C, H, W] tensors (augment_on=cpu), or a DecodedBatch that
    crops_on_device turns into that list on the training device (augment_on=gpu).
    `cfg`'s settings were checked when the config loaded; what only the data can tell (the
    folder, its images, enough of them for one batch) is checked here.
    """
    dataset = MultiCropDataset(open_training_images(cfg), loader_transform(cfg), seed, masking)
    sampler = epoch_sampler(cfg, dataset.images, world_size, rank, seed)
    if sampler.samples_per_rank < batch_size:
        raise DataError(
            f"{len(dataset)} images give {sampler.samples_per_rank} per rank on {world_size} rank(s), "
            f"fewer than one batch of {batch_size}: lower the batch size or add images"
        )
    workers = cfg.num_workers
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        collate_fn=loader_collate(cfg),
        pin_memory=pin_memory,
        # Workers hold no per-epoch state (the epoch travels in each key), so keeping
        # them alive across epochs is safe and saves their start-up cost.
        persistent_workers=workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        # Starting an epoch's iterator draws a worker base seed; from a private generator it
        # does not consume the global RNG, so a run resumed mid-epoch (one extra iterator
        # start) keeps the same stochastic-depth stream as one never interrupted.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler, dataset
