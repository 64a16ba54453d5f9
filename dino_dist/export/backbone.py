"""A checkpoint's backbone as a plain state dict, for our tools, for timm or for dinov2.

`dino` (the default): the official DINO key names, what `facebookresearch/dino`'s pretrained
files hold, so the weights load with `strict=True` into `dino_dist.models.build_backbone(...)`
or the reference ViT (a model with DINOv2 options holds their DINOv2-named tensors too).
`timm`: the same tensors for `timm.create_model(NAME, num_classes=0)`, as a `.pth` or a
`.safetensors` (a model with DINOv2 options in timm's DINOv2 layout, export.dinov2).
`dinov2`: the official dinov2 backbone's state dict (export.dinov2). A small `<output>.json`
beside the weights records the architecture (and the model name and arguments that load them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dino_dist.checkpoint.files import atomic_write
from dino_dist.checkpoint.reader import read_whole
from dino_dist.errors import CheckpointError
from dino_dist.export.dinov2 import (DINOV2_ARCHS, dinov2_model_args, dinov2_weights,
                                     timm_dinov2_model, timm_dinov2_weights, uses_dinov2_blocks)
from dino_dist.models import VIT_ARCHS
from dino_dist.models.vit import DINOV2_LAYERSCALE_INIT, vit_options

BACKBONE_PREFIX = "backbone."
FORMATS = ("dino", "timm", "dinov2")

# (arch, patch) -> the timm model with the same layers. Their parameter names are the DINO
# names (pos_embed holds the CLS position, as DINO's), their extra modules (ls1/ls2, q_norm,
# k_norm, norm_pre, fc_norm, head with num_classes=0) are weightless identities, and their
# forward pools the CLS token after the final norm (global_pool="token"), as our ViT returns:
# the weights need no renaming. tests/test_export_timm.py checks all of it against timm.
TIMM_MODELS: dict[tuple[str, int], str] = {
    ("vit_tiny", 16): "vit_tiny_patch16_224",
    ("vit_small", 16): "vit_small_patch16_224",
    ("vit_small", 8): "vit_small_patch8_224",
    ("vit_small", 32): "vit_small_patch32_224",
    ("vit_base", 16): "vit_base_patch16_224",
    ("vit_base", 8): "vit_base_patch8_224",
    ("vit_base", 32): "vit_base_patch32_224",
    ("vit_large", 14): "vit_large_patch14_224",
    ("vit_large", 16): "vit_large_patch16_224",
    ("vit_large", 32): "vit_large_patch32_224",
}
TIMM_IMG_SIZE = 224  # what every name above is built for
# vit_mini (our demo size) has no timm name: timm builds it from this one, sizes overridden.
TIMM_NAME_FOR_OWN_SIZES = "vit_small_patch16_224"
SAFETENSORS_SUFFIX = ".safetensors"


def backbone_weights(state: dict[str, Any], which: str = "teacher") -> dict[str, torch.Tensor]:
    return {k[len(BACKBONE_PREFIX):]: v.detach().clone().contiguous()
            for k, v in state[which].items() if k.startswith(BACKBONE_PREFIX)}


def describe(state: dict[str, Any], source: Path, which: str) -> dict[str, Any]:
    model = state["config"]["model"]
    return {"format": "dino_dist backbone", "which": which, "arch": model["arch"],
            "patch_size": model["patch_size"], "img_size": model["img_size"],
            "step": state["step"], "epoch": state["epoch"], "source": str(source)}


def timm_model_for(arch: str, patch_size: int, img_size: int) -> tuple[str, dict[str, Any]]:
    """(name, kwargs) for `timm.create_model(name, **kwargs)`, a model these weights fit."""
    kwargs: dict[str, Any] = {"num_classes": 0}
    if (arch, patch_size) in TIMM_MODELS:
        name = TIMM_MODELS[(arch, patch_size)]
    elif arch == "vit_mini":
        name = TIMM_NAME_FOR_OWN_SIZES
        embed_dim, depth, num_heads = VIT_ARCHS[arch]
        kwargs.update(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                      patch_size=patch_size)
    else:
        what = f"{arch} patch {patch_size}" if arch in VIT_ARCHS else arch
        have = ", ".join(f"{a} patch {p}" for a, p in TIMM_MODELS)
        raise CheckpointError(f"timm has no model for {what} (it has {have}, and vit_mini at "
                              f"any patch): export it with --format dino")
    if img_size != TIMM_IMG_SIZE:  # the position table of another resolution
        kwargs["img_size"] = img_size
    return name, kwargs


def export(source: Path, output: Path, which: str = "teacher", target: str = "dino",
           safetensors: bool = False) -> tuple[dict, int]:
    """Write the backbone of checkpoint `source` to `output` (+ `output.json`)."""
    state = read_whole(source)
    weights = backbone_weights(state, which)
    info = describe(state, source, which)
    if target != "dino":
        weights, target_info = converted(weights, state["config"]["model"], target)
        info.update(target_info)
    output.parent.mkdir(parents=True, exist_ok=True)
    if safetensors:
        atomic_write(output, lambda f: f.write(safetensors_bytes(weights)))
    else:
        atomic_write(output, lambda f: torch.save(weights, f))
    atomic_write(sidecar(output), lambda f: f.write(json.dumps(info, indent=1).encode()))
    return info, sum(v.numel() for v in weights.values())


def converted(weights: dict[str, torch.Tensor], model: dict[str, Any],
              target: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights for the `timm` or `dinov2` target and what its sidecar records about them."""
    arch, patch_size, img_size = model["arch"], model["patch_size"], model["img_size"]
    options = vit_options(weights)
    # Only a model built afresh from the sidecar starts from it; runs before the option
    # existed, or without it, get DINOv2's.
    layerscale_init = model.get("layerscale") or DINOV2_LAYERSCALE_INIT
    if target == "dinov2":
        kwargs = dinov2_model_args(arch, patch_size, img_size, options, layerscale_init)
        return dinov2_weights(weights, kwargs["embed_dim"]), {
            "format": "dinov2", "dinov2_arch": arch if arch in DINOV2_ARCHS else None,
            "dinov2_kwargs": kwargs}
    if uses_dinov2_blocks(options):
        name, kwargs = timm_dinov2_model(arch, patch_size, img_size, options, layerscale_init)
        weights = timm_dinov2_weights(weights)
    else:
        name, kwargs = timm_model_for(arch, patch_size, img_size)
        weights = {k: v for k, v in weights.items() if k != "mask_token"}  # timm has none
    return weights, {"format": "timm", "timm_model": name, "timm_kwargs": kwargs}


def safetensors_bytes(weights: dict[str, torch.Tensor]) -> bytes:
    try:
        from safetensors.torch import save
    except ImportError:
        raise CheckpointError('--safetensors needs the safetensors package: '
                              'pip install -e ".[timm]"') from None
    # What safetensors.torch.save_file writes, as bytes, so the file can be written atomically.
    return save(weights, metadata={"format": "pt"})


def sidecar(weights_file: Path) -> Path:
    return weights_file.with_name(weights_file.name + ".json")


def read_exported(weights_file: Path) -> dict[str, torch.Tensor]:
    """The weights of a `dino-export` file, pickled (.pth) or safetensors."""
    if weights_file.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file
        return load_file(str(weights_file))
    return torch.load(weights_file, map_location="cpu", weights_only=True)
