"""Backbone + head wrapper that batches crops of equal resolution."""
from typing import Sequence, Union

import torch
import torch.nn as nn

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


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per resolution group and the head once overall.

    Output rows are crop-major: all of crop 0's batch, then crop 1's, and so on.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

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
        features = [
            self.backbone(torch.cat(list(crops[start:end])))
            for start, end in resolution_groups(crops)
        ]
        if output == "backbone":
            return torch.cat(features)
        # One head pass over everything keeps BatchNorm statistics (if any) global.
        return self.head(torch.cat(features))
