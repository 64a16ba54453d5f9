"""The device augmentation (`data.augment_on=gpu`) of one micro-batch, alone: its aten ops and time.

The batch is made as the loader makes it (uint8 images of ImageNet's usual shape, each with
its crops' parameters drawn by CropParamSampler, padded onto one canvas) and already sits on
the device, so what is measured is `augment_batch` only: the work a step adds per micro-batch
when the crops are made on the GPU.
"""
from __future__ import annotations

import torch

from dino_dist.bench.images import BENCH_IMAGE_SIZE
from dino_dist.bench.op_count import count_ops
from dino_dist.bench.timing import timed
from dino_dist.data.crop_params import CropParamSampler
from dino_dist.data.device_augment import DecodedBatch, augment_batch, collate_decoded
from dino_dist.data.recipe import CropRecipe


def decoded_batch(data_config, batch_size: int, device: torch.device, seed: int = 0) -> DecodedBatch:
    """A loader's micro-batch for `data_config`'s crops, on `device`."""
    recipe = CropRecipe.from_config(data_config)
    sampler = CropParamSampler(recipe)
    width, height = BENCH_IMAGE_SIZE
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(batch_size):
        torch.manual_seed(seed * 100_003 + index)  # the loader seeds each sample's draws
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        samples.append((sampler(image), 0, 0))
    return collate_decoded(samples, recipe)[0].to(device)


def augment_figures(data_config, batch_size: int, device: torch.device, calls: int = 5) -> dict:
    """aten ops per call (with the top ops) and milliseconds per call of augment_batch."""
    batch = decoded_batch(data_config, batch_size, device)
    augment_batch(batch)  # first-call costs (allocations, kernel selection) left out
    ops = count_ops(lambda: augment_batch(batch))
    seconds = timed(lambda: augment_batch(batch), calls, device)
    return {"aten_ops_per_call": ops.total, "top_ops": ops.top(8),
            "ms_per_micro_batch": round(seconds / calls * 1e3, 3), "batch_size": batch_size}
