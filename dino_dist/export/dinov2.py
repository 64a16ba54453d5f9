"""Our ViT with DINOv2 options (LayerScale, registers, SwiGLU), for the official dinov2
backbone and for timm's DINOv2 ViTs.

dinov2: our names are DINOv2's already (`ls1.gamma`, `register_tokens`, `mlp.w12`/`w3`,
`mask_token`, pos_embed with the CLS position, blocks without chunks); the official model
always holds a mask token, so a model trained without one gets zeros (never used when no
patch is masked). timm builds the same model another way: registers in `reg_token`, the
CLS position folded into `cls_token` and `pos_embed` over the patches only
(`no_embed_class`), SwiGLU as `mlp.fc1`/`fc2`. Both are the same sums on the same tensors;
tests/test_export_dinov2.py checks the names against timm's converter of official dinov2
files and the features against timm's forward.
"""
from __future__ import annotations

from typing import Any

import torch

from dino_dist.errors import CheckpointError
from dino_dist.models import VIT_ARCHS
from dino_dist.models.vit import swiglu_hidden_dim

# Our sizes that dinov2's hub names (vit_small(...), vit_giant2(...)) build as well.
DINOV2_ARCHS = ("vit_small", "vit_base", "vit_large", "vit_giant2")
DINOV2_MLP_RATIO = 4.0  # ours, and dinov2's for every size (SwiGLU narrows it by 2/3 itself)
# Our position-table interpolation (+0.1 on the target grid, no antialiasing) is dinov2's
# default; recorded so a model built from the sidecar matches at other resolutions too.
DINOV2_INTERPOLATION = {"interpolate_offset": 0.1, "interpolate_antialias": False}
# arch -> timm's DINOv2 name (patch 14, LayerScale; SwiGLU only for the giant).
TIMM_DINOV2_MODELS = {"vit_small": "vit_small_patch14_dinov2",
                      "vit_base": "vit_base_patch14_dinov2",
                      "vit_large": "vit_large_patch14_dinov2",
                      "vit_giant2": "vit_giant_patch14_dinov2"}
TIMM_DINOV2_PATCH = 14
TIMM_DINOV2_REGISTERS = (0, 4)  # timm names `..._reg4_dinov2` for 4
# Another size or option set: timm builds it from one of these, sizes and options overridden.
TIMM_DINOV2_BASE = {"mlp": "vit_small_patch14_dinov2", "swiglu": "vit_giant_patch14_dinov2"}


def uses_dinov2_blocks(options: dict[str, Any]) -> bool:
    """Whether the model differs from a DINO ViT in more than a mask token."""
    return (options["layerscale_init"] > 0 or options["num_registers"] > 0
            or options["ffn"] != "mlp")


def dinov2_weights(weights: dict[str, torch.Tensor], embed_dim: int) -> dict[str, torch.Tensor]:
    out = dict(weights)
    if "mask_token" not in out:
        out["mask_token"] = torch.zeros(1, embed_dim)
    return out


def dinov2_model_args(arch: str, patch_size: int, img_size: int, options: dict[str, Any],
                      layerscale_init: float) -> dict[str, Any]:
    """Keywords of dinov2's `DinoVisionTransformer(**kwargs)` that these weights load into."""
    if arch not in VIT_ARCHS:
        raise CheckpointError(f"dinov2 has no {arch} backbone (only ViTs): export it with "
                              f"--format dino")
    embed_dim, depth, num_heads = VIT_ARCHS[arch]
    has_layerscale = options["layerscale_init"] > 0
    return {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim,
            "depth": depth, "num_heads": num_heads, "mlp_ratio": DINOV2_MLP_RATIO,
            "init_values": layerscale_init if has_layerscale else None,
            "num_register_tokens": options["num_registers"],
            "ffn_layer": "swiglufused" if options["ffn"] == "swiglu" else "mlp",
            "block_chunks": 0, **DINOV2_INTERPOLATION}


def timm_dinov2_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under timm's names; timm's ViT has no mask token, so it is left out."""
    out = {}
    for name, tensor in weights.items():
        if name == "mask_token":
            continue
        out[name.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = tensor
    if "register_tokens" in out:
        # Ours adds pos_embed[:, 0] to the CLS token in every forward; timm stores the sum.
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = (out["cls_token"] + out["pos_embed"][:, :1]).contiguous()
        out["pos_embed"] = out["pos_embed"][:, 1:].contiguous()
    return out


def timm_dinov2_model(arch: str, patch_size: int, img_size: int, options: dict[str, Any],
                      layerscale_init: float) -> tuple[str, dict[str, Any]]:
    """(name, kwargs) for `timm.create_model(name, **kwargs)`: timm's own DINOv2 name where
    one fits, else a DINOv2 name with the size and options overridden."""
    if arch not in VIT_ARCHS:
        raise CheckpointError(f"timm has no DINOv2 model for {arch}: export it with "
                              f"--format dino")
    registers, swiglu = options["num_registers"], options["ffn"] == "swiglu"
    kwargs: dict[str, Any] = {"num_classes": 0, "img_size": img_size}  # its names are for 518
    if (arch in TIMM_DINOV2_MODELS and patch_size == TIMM_DINOV2_PATCH
            and options["layerscale_init"] > 0 and registers in TIMM_DINOV2_REGISTERS
            and swiglu == (arch == "vit_giant2")):
        name = TIMM_DINOV2_MODELS[arch]
        return (name.replace("_dinov2", "_reg4_dinov2") if registers else name), kwargs
    embed_dim, depth, num_heads = VIT_ARCHS[arch]
    # 0, not None, for no LayerScale: create_model drops None arguments (the name's own 1e-5
    # would stay), and timm's blocks leave LayerScale out for a false init value.
    kwargs.update(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size,
                  init_values=layerscale_init if options["layerscale_init"] > 0 else 0.0)
    if registers:
        kwargs.update(reg_tokens=registers, no_embed_class=True)
    if swiglu:
        kwargs["mlp_ratio"] = timm_swiglu_mlp_ratio(embed_dim)
    return TIMM_DINOV2_BASE[options["ffn"]], kwargs


def timm_swiglu_mlp_ratio(embed_dim: int) -> float:
    """timm sizes its packed SwiGLU's first layer as int(embed_dim * mlp_ratio), both halves
    together; half a unit more than exact keeps float rounding from landing one short."""
    packed = 2 * swiglu_hidden_dim(int(embed_dim * DINOV2_MLP_RATIO))
    return (packed + 0.5) / embed_dim
