"""A training batch as the loader hands it over: (crops, labels, skipped) and, when the iBOT
loss is on, the global crops' patch masks as a fourth element.

The masks ride beside the crops rather than inside them so that both augmentation paths
(crops made in the loader, or a DecodedBatch made into crops on the device) carry them alike.
"""
from __future__ import annotations

from typing import Any

import torch


def collate_masks(batch: list[tuple]) -> tuple:
    """() without masks, else (masks,): the samples' [global crops, patches] masks as one
    [global crops x B, patches] bool tensor, crop-major like the crops themselves."""
    if len(batch[0]) < 4:
        return ()
    masks = torch.stack([sample[3] for sample in batch])  # [B, global crops, patches]
    return (masks.transpose(0, 1).flatten(0, 1),)


def split_batch(batch: tuple) -> tuple[Any, torch.Tensor, int, torch.Tensor | None]:
    """(crops, labels, skipped, masks or None) of a loader batch, with or without masks."""
    crops, labels, skipped = batch[:3]
    return crops, labels, skipped, batch[3] if len(batch) > 3 else None
