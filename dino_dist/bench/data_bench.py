"""`dino-bench --data-only`: multi-crop throughput per worker process, ours against the reference.

Both pipelines decode the same JPEG files and cut the same crop counts and sizes; each runs
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
from dino_dist.data.datasets import MultiCropDataset
from dino_dist.data.folder import find_images
from dino_dist.data.loader import loader_transform


def project_sampler(data_cfg: Any, root: Path) -> Callable[[int], list]:
    dataset = MultiCropDataset(root, loader_transform(data_cfg), seed=0)
    # The real path: decode, per-sample RNG seeding, every crop (or its parameters).
    return lambda index: dataset[(0, index % len(dataset))][0]


def check_reference_settings(data_cfg: Any) -> None:
    if data_cfg.global_crops_number != 2:
        raise ConfigError("the reference pipeline has exactly 2 global crops: "
                          "set data.global_crops_number=2 for --data-only")


def reference_sampler(data_cfg: Any, root: Path) -> Callable[[int], list]:
    files = find_images(root)[0]
    reference = ReferenceMultiCrop(
        data_cfg.global_crops_scale, data_cfg.local_crops_scale, data_cfg.local_crops_number,
        data_cfg.global_crop_size, data_cfg.local_crop_size)
    return lambda index: reference(pil_loader(files[index % len(files)]))


def _time_images(sample: Callable[[int], list], start: int, count: int) -> float:
    began = time.perf_counter()
    for index in range(start, start + count):
        sample(index)
    return time.perf_counter() - began


def run_data_benchmark(data_cfg: Any, root: Path, images_per_round: int = 16,
                       rounds: int = 3) -> dict:
    check_reference_settings(data_cfg)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs its transforms on one thread
    try:
        with warnings.catch_warnings():
            # torchvision's decoders announce their move to torchcodec; not news here.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            pipelines = {"project": project_sampler(data_cfg, root),
                         "reference": reference_sampler(data_cfg, root)}
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
        "crops": {"global": [data_cfg.global_crops_number, data_cfg.global_crop_size],
                  "local": [data_cfg.local_crops_number, data_cfg.local_crop_size]},
        "images_per_round": images_per_round,
        "rounds": rounds,
        "project_images_per_s_per_worker": round(rates["project"], 2),
        "reference_images_per_s_per_worker": round(rates["reference"], 2),
        "speedup_vs_reference": round(rates["project"] / rates["reference"], 3),
    }
