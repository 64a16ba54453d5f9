"""The iBOT masks of a micro-batch's global crops, as the models and the loss use them.

The loader draws the masks on the host. What depends on how many patches are masked (which
tokens to pick, their weights) is worked out there too, so that picking the masked tokens on
the device is an index_select of known size: the host never waits for the device to count.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


def mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """1 / (masked patches of its image) for each masked token, in the order of masks[masks].

    `masks` [n_images, P] bool; dinov2's `masks_weight` (the count clamped to at least 1).
    """
    per_image = masks.sum(dim=1)
    weight = 1.0 / per_image.clamp(min=1).float()
    return torch.repeat_interleave(weight, per_image)


class PatchMasks(NamedTuple):
    """`dense` [images, patches] bool: where the mask token replaces a patch; `index` [masked]:
    the masked tokens' flat positions in [images x patches], row-major (the order of
    dense[dense]); `weights` [masked]: mask_weights. A NamedTuple, so DDP and FSDP pass it
    through a forward as they find it."""
    dense: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def from_host(cls, masks: torch.Tensor, device: torch.device | str) -> "PatchMasks":
        """From the loader's masks (on the host), moved to `device` without waiting."""
        index = masks.flatten().nonzero().squeeze(1)
        parts = (masks, index, mask_weights(masks))
        return cls(*(part.to(device, non_blocking=True) for part in parts))

    @property
    def n_images(self) -> int:
        return self.dense.shape[0]

    def select(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """The masked rows of `patch_tokens` [images, patches, dim]: [masked, dim]."""
        return patch_tokens.flatten(0, 1).index_select(0, self.index)
