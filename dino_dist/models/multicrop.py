"""Backbone + head wrapper that batches crops of equal resolution, or packs two resolutions."""
from typing import NamedTuple, Sequence, Union

import torch
import torch.nn as nn

from dino_dist.distributed.units import ParallelUnits, declared_units
from dino_dist.models.packing import packs_evenly
from dino_dist.models.patch_masks import PatchMasks

Crops = Union[torch.Tensor, Sequence[torch.Tensor]]
OUTPUTS = ("head", "backbone", "cls_attention", "train")


class TrainOutputs(NamedTuple):
    """What a training forward returns (a NamedTuple: FSDP2 and DDP find tensors in it).

    head: the head's outputs for every crop's CLS token, crop-major [crops x B, out_dim].
    global_cls: the backbone's CLS features of the global crops [global crops x B, dim]
        (KoLeo), rows of `head`'s first global crops x B.
    patch_head: the patch head's outputs at the masked positions of the global crops
        [masked tokens, patch out_dim], in the order of the masks' `index`; None without masks.
    """
    head: torch.Tensor
    global_cls: torch.Tensor
    patch_head: torch.Tensor | None


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

    def __init__(self, backbone: nn.Module, head: nn.Module, packed_crops: bool = False,
                 patch_head: nn.Module | None = None):
        """`patch_head`: a head of its own for the iBOT patch tokens; None shares `head`."""
        super().__init__()
        if packed_crops and not hasattr(backbone, "forward_packed"):
            raise ValueError(f"packed crops need a ViT backbone; {type(backbone).__name__} has "
                             f"no packed forward")
        self.backbone = backbone
        self.head = head
        self.packed_crops = packed_crops
        if patch_head is not None:  # only then a key of the state_dict: old checkpoints load
            self.patch_head = patch_head

    def parallel_units(self) -> ParallelUnits:
        """The backbone's units, then the heads': the order forward runs them."""
        units = declared_units(self.backbone) + declared_units(self.head)
        if hasattr(self, "patch_head"):
            units = units + declared_units(self.patch_head)
        return units

    def forward(self, crops: Crops, output: str = "head", masks: PatchMasks | None = None,
                n_global: int = 0, mask_inputs: bool = True) -> torch.Tensor | TrainOutputs:
        """`output`: "head" (the head's outputs), "backbone" (the backbone's features),
        "cls_attention" (a ViT backbone's last-block CLS attention [B, heads, tokens]; these
        two are for evaluation) or "train" (TrainOutputs: the head's outputs, the global
        crops' CLS features and, given `masks`, the patch head's outputs at the masked
        patches of the first `n_global` crops; `mask_inputs` false (the teacher) reads those
        positions without replacing their input by the mask token).

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
        if output == "train":
            return self._train_outputs(crops, masks, n_global, mask_inputs)
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

    def _train_outputs(self, crops: Sequence[torch.Tensor], masks: PatchMasks | None,
                       n_global: int, mask_inputs: bool) -> TrainOutputs:
        n_global = n_global or len(crops)
        global_rows = sum(len(c) for c in crops[:n_global])
        if masks is None:
            cls = self._cls_features(crops)
            return TrainOutputs(self.head(cls), cls[:global_rows], None)
        cls, patches = self._cls_and_masked_patches(crops, masks, n_global, mask_inputs)
        if hasattr(self, "patch_head"):
            return TrainOutputs(self.head(cls), cls[:global_rows], self.patch_head(patches))
        # One pass of the shared head over CLS and patch tokens: a sharded head is gathered
        # once, and its parameters take one gradient from both uses.
        outputs = self.head(torch.cat((cls, patches)))
        return TrainOutputs(outputs[: len(cls)], cls[:global_rows], outputs[len(cls):])

    def _cls_features(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Every crop's CLS features, packed when the student packs and the crops allow."""
        images = packable_images(crops) if self.packed_crops else None
        if images is not None:
            return self.backbone.forward_packed(*images)
        return torch.cat([self.backbone(torch.cat(list(crops[start:end])))
                          for start, end in resolution_groups(crops)])

    def _cls_and_masked_patches(self, crops: Sequence[torch.Tensor], masks: PatchMasks,
                                n_global: int, mask_inputs: bool
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS features of every crop, patch tokens at the masked positions of the global
        crops). The global crops run on their own, since only they carry masks."""
        token_masks = masks.dense if mask_inputs else None
        local = crops[n_global:]
        images = packable_images(crops) if self.packed_crops and local else None
        if images is not None:
            cls, patches = self.backbone.forward_packed_tokens(*images, global_masks=token_masks)
            return cls, masks.select(patches)
        tokens = self.backbone.forward_tokens(torch.cat(list(crops[:n_global])), token_masks)
        patches = masks.select(tokens[:, self.backbone.num_prefix_tokens:])
        cls = [tokens[:, 0]] + [self.backbone(torch.cat(list(local[start:end])))
                                for start, end in resolution_groups(local)]
        return torch.cat(cls), patches
