"""`dino-bench --data-only`: multi-crop throughput per worker process, ours against the reference.

On a shard set (a folder of .tar shards, a pattern, s3://) ours is timed alone: reading each
batch's byte ranges, decoding and cropping, as a loader process does. On a folder, both
pipelines decode the same JPEG files and cut the same crop counts and sizes; each runs
on one thread, as inside a DataLoader worker. They alternate in rounds so that a machine
busy with something else slows both alike, and the ratio stays meaningful. With
data.augment_on=gpu, ours is what a worker then does: decode and draw the crops' parameters
(the crops themselves are made on the training device, not measured here).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from dino_dist.bench.reference_pipeline import ReferenceMultiCrop, pil_loader
from dino_dist.config import ConfigError
from dino_dist.data.datasets import MultiCropDataset, open_images
from dino_dist.data.folder import FolderImages
from dino_dist.data.images import ImageSet
from dino_dist.data.shard_set import looks_like_shard_set
from dino_dist.data.loader import loader_transform


def project_sampler(data_cfg: Any, images: ImageSet) -> Callable[[list[int]], list]:
    dataset = MultiCropDataset(images, loader_transform(data_cfg), seed=0)
    # The real path, a batch at a time as a loader process runs it: its reads fetched
    # together (a shard set), decode, per-sample RNG seeding, every crop (or its parameters).
    return lambda indices: dataset.__getitems__([(0, i % len(dataset)) for i in indices])


def check_reference_settings(data_cfg: Any) -> None:
    if data_cfg.global_crops_number != 2:
        raise ConfigError("the reference pipeline has exactly 2 global crops: "
                          "set data.global_crops_number=2 for --data-only")


def reference_sampler(data_cfg: Any, images: FolderImages) -> Callable[[list[int]], list]:
    files = images.files
    reference = ReferenceMultiCrop(
        data_cfg.global_crops_scale, data_cfg.local_crops_scale, data_cfg.local_crops_number,
        data_cfg.global_crop_size, data_cfg.local_crop_size)
    return lambda indices: [reference(pil_loader(files[i % len(files)])) for i in indices]


def _time_images(sample: Callable[[list[int]], list], start: int, count: int) -> float:
    began = time.perf_counter()
    sample(list(range(start, start + count)))
    return time.perf_counter() - began


def run_data_benchmark(data_cfg: Any, root: str | Path, images_per_round: int = 16,
                       rounds: int = 3) -> dict:
    """Images/s of one loader process; the reference pipeline runs beside ours on a folder
    (it reads files only), a shard set (local or s3://) is timed alone."""
    with_reference = not looks_like_shard_set(str(root))
    if with_reference:
        check_reference_settings(data_cfg)
    images = open_images(str(root))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs its transforms on one thread
    try:
        with warnings.catch_warnings():
            # torchvision's decoders announce their move to torchcodec; not news here.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            pipelines = {"project": project_sampler(data_cfg, images)}
            if with_reference:
                pipelines["reference"] = reference_sampler(data_cfg, images)
            for sample in pipelines.values():
                _time_images(sample, 0, 2)  # warm-up: first-call allocations and imports
            seconds = dict.fromkeys(pipelines, 0.0)
            for round_index in range(rounds):
                for name, sample in pipelines.items():
                    seconds[name] += _time_images(sample, round_index * images_per_round,
                                                  images_per_round)
    finally:
        torch.set_num_threads(threads_before)
    images = images_per_round * rounds
    rates = {name: images / max(spent, 1e-9) for name, spent in seconds.items()}
    return {
        "mode": "data_only",
        "augment_on": data_cfg.augment_on,
        "images": str(root),
        "source": "folder" if with_reference else "shards",
        "crops": {"global": [data_cfg.global_crops_number, data_cfg.global_crop_size],
                  "local": [data_cfg.local_crops_number, data_cfg.local_crop_size]},
        "images_per_round": images_per_round,
        "rounds": rounds,
        "project_images_per_s_per_worker": round(rates["project"], 2),
        **({"reference_images_per_s_per_worker": round(rates["reference"], 2),
            "speedup_vs_reference": round(rates["project"] / rates["reference"], 3)}
           if with_reference else {}),
    }
