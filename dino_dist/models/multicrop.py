"""Backbone + head wrapper that batches crops of equal resolution, or packs two resolutions."""
from typing import Sequence, Union

import torch
import torch.nn as nn

from dino_dist.distributed.units import ParallelUnits, declared_units
from dino_dist.models.packing import packs_evenly

Crops = Union[torch.Tensor, Sequence[torch.Tensor]]
OUTPUTS = ("head", "backbone", "cls_attention")


def resolution_groups(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(start, end) index ranges of consecutive crops sharing their last dim."""
    groups = []
    start = 0
    for index in range(1, len(crops) + 1):
        if index == len(crops) or crops[index].shape[-1] != crops[start].shape[-1]:
            groups.append((start, index))
            start = index
    return groups


def packable_images(crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(global images, local images) when the crops are two resolutions, the first crops then
    the second, that pack evenly (models.packing); None when they do not."""
    groups = resolution_groups(crops)
    if len(groups) != 2:
        return None
    global_crops, local_crops = (crops[start:end] for start, end in groups)
    if not packs_evenly(sum(len(c) for c in global_crops), sum(len(c) for c in local_crops)):
        return None
    return torch.cat(list(global_crops)), torch.cat(list(local_crops))


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per resolution group and the head once overall.

    Output rows are crop-major: all of crop 0's batch, then crop 1's, and so on.

    `packed_crops` (ViT backbones): when the head's outputs are asked for and the crops pack
    evenly (`packable_images`), the backbone runs both resolutions in one packed pass
    (`forward_packed`); same outputs, other crop sets run per resolution.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, packed_crops: bool = False):
        super().__init__()
        if packed_crops and not hasattr(backbone, "forward_packed"):
            raise ValueError(f"packed crops need a ViT backbone; {type(backbone).__name__} has "
                             f"no packed forward")
        self.backbone = backbone
        self.head = head
        self.packed_crops = packed_crops

    def parallel_units(self) -> ParallelUnits:
        """The backbone's units, then the head's: the order forward runs them."""
        return declared_units(self.backbone) + declared_units(self.head)

    def forward(self, crops: Crops, output: str = "head") -> torch.Tensor:
        """`output`: "head" (the head's outputs), "backbone" (the backbone's features) or
        "cls_attention" (a ViT backbone's last-block CLS attention [B, heads, tokens]); the
        last two are for evaluation.

        Evaluation goes through this forward rather than calling `self.backbone` directly:
        when the model is sharded (FSDP2), only the root module's own forward gathers the
        root's parameters (patch embedding, position table, CLS token, head).
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if output == "cls_attention":  # one resolution only: other grids have other token counts
            return self.backbone.get_last_cls_attention(torch.cat(list(crops)))
        if output == "head" and self.packed_crops:
            images = packable_images(crops)
            if images is not None:
                return self.head(self.backbone.forward_packed(*images))
        features = [
            self.backbone(torch.cat(list(crops[start:end])))
            for start, end in resolution_groups(crops)
        ]
        if output == "backbone":
            return torch.cat(features)
        # One head pass over everything keeps BatchNorm statistics (if any) global.
        return self.head(torch.cat(features))
