"""The optimizer's parameter groups: which parameters are decayed, and each group's share of
the learning rate (DINOv2's layer-wise decay and patch-embedding factor).

With both factors at 1 the groups are DINO's two (decayed, not decayed), in the order older
checkpoints stored their optimizer state.
"""
from __future__ import annotations

import re

from torch import nn

from dino_dist.models import param_groups_for_weight_decay

# Backbone parameters below the first block: they take the deepest decay, as in DINOv2.
_EMBEDDINGS = ("pos_embed", "patch_embed", "cls_token", "mask_token", "register_tokens")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_of(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the heads."""
    if name.startswith("backbone.") and any(f".{part}" in name for part in _EMBEDDINGS):
        return 0
    block = _BLOCK.search(name)
    if name.startswith("backbone.") and block:
        return int(block.group(1)) + 1
    return depth + 1


def lr_multiplier(name: str, depth: int, layerwise_decay: float, patch_embed_lr_mult: float) -> float:
    multiplier = layerwise_decay ** (depth + 1 - layer_of(name, depth))
    if ".patch_embed." in f".{name}":
        multiplier *= patch_embed_lr_mult
    return multiplier


def optimizer_param_groups(model: nn.Module, layerwise_decay: float = 1.0,
                           patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """Groups of trainable parameters sharing (lr multiplier, weight decay or not); the
    optimizer update sets each group's lr to the scheduled lr times its `lr_multiplier`."""
    if layerwise_decay == 1.0 and patch_embed_lr_mult == 1.0:
        return param_groups_for_weight_decay(model)
    depth = len(getattr(getattr(model, "backbone", None), "blocks", ()))
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # The same exemption as DINO's groups: biases, norms and LayerScale (all 1-D).
        decays = not (name.endswith(".bias") or param.ndim == 1)
        multiplier = lr_multiplier(name, depth, layerwise_decay, patch_embed_lr_mult)
        group = groups.setdefault((multiplier, decays), {
            "params": [], "lr_multiplier": multiplier, "weight_decay_applies": decays,
            **({} if decays else {"weight_decay": 0.0})})
        group["params"].append(param)
    return list(groups.values())
