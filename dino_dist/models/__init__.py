"""Backbones, DINO head and the multi-crop wrapper, plus small builders."""
import torch.nn as nn

from dino_dist.models.head import DINOHead, WeightNormLinear
from dino_dist.models.multicrop import MultiCropWrapper
from dino_dist.models.resnet import resnet50_backbone
from dino_dist.models.vit import VisionTransformer

# name -> (embed_dim, depth, num_heads). The first three are the paper's sizes; vit_large is
# ViT-L as timm and DINOv2 size it (the DINO release stops at ViT-B, its key layout does not
# change with size); vit_giant2 is DINOv2's ViT-g (trained there with ffn="swiglu", which
# is an option, not part of the size); vit_mini is not from the paper, it is a small size for
# demos and tests.
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
    "vit_mini": (128, 4, 4),
}
RESNET_ARCHS = ("resnet50",)
ARCH_NAMES: tuple[str, ...] = tuple(VIT_ARCHS) + RESNET_ARCHS


def build_backbone(
    arch: str, patch_size: int = 16, drop_path_rate: float = 0.0, img_size: int = 224, *,
    layerscale_init: float = 0.0, num_registers: int = 0, ffn: str = "mlp",
    drop_path_uniform: bool = False, mask_token: bool = False,
) -> nn.Module:
    """Backbone with an `embed_dim` attribute; ViT-only arguments are ignored for ResNet
    (the keyword-only ones are the DINOv2 options of `VisionTransformer`)."""
    if arch in VIT_ARCHS:
        embed_dim, depth, num_heads = VIT_ARCHS[arch]
        return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                                 depth=depth, num_heads=num_heads, drop_path_rate=drop_path_rate,
                                 layerscale_init=layerscale_init, num_registers=num_registers,
                                 ffn=ffn, drop_path_uniform=drop_path_uniform,
                                 mask_token=mask_token)
    if arch == "resnet50":
        return resnet50_backbone()
    raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCH_NAMES)}")


def build_model(arch: str, patch_size: int, drop_path_rate: float, out_dim: int,
                use_bn_in_head: bool = False, norm_last_layer: bool = True,
                head_hidden_dim: int = 2048, head_bottleneck_dim: int = 256,
                img_size: int = 224, packed_crops: bool = False, *,
                patch_head_out_dim: int = 0, **backbone_options) -> MultiCropWrapper:
    """`packed_crops`: run two crop resolutions in one packed pass (ViT archs only).
    `patch_head_out_dim`: > 0 gives the iBOT patch tokens a head of their own, that wide;
    `backbone_options`: build_backbone's DINOv2 options (LayerScale, registers, ...)."""
    backbone = build_backbone(arch, patch_size=patch_size, drop_path_rate=drop_path_rate,
                              img_size=img_size, **backbone_options)

    def head(width: int) -> DINOHead:
        return DINOHead(backbone.embed_dim, width, use_bn=use_bn_in_head,
                        norm_last_layer=norm_last_layer, hidden_dim=head_hidden_dim,
                        bottleneck_dim=head_bottleneck_dim)

    return MultiCropWrapper(backbone, head(out_dim), packed_crops=packed_crops,
                            patch_head=head(patch_head_out_dim) if patch_head_out_dim else None)


def last_layer_parameters(model: MultiCropWrapper) -> list[nn.Parameter]:
    """Trainable prototype-layer parameters (frozen during the first epoch(s)), of the
    patch head too when it has its own."""
    heads = [model.head] + ([model.patch_head] if hasattr(model, "patch_head") else [])
    return [p for head in heads for p in head.last_layer.parameters() if p.requires_grad]


def param_groups_for_weight_decay(model: nn.Module) -> list[dict]:
    """Split trainable parameters as the official `get_params_groups` does.

    Biases and 1-D tensors (norm scales/shifts) are exempt from weight decay;
    cls_token and pos_embed are 3-D and therefore decayed, as upstream.
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [
        {"params": regularized, "weight_decay_applies": True},
        {"params": not_regularized, "weight_decay": 0.0, "weight_decay_applies": False},
    ]


__all__ = [
    "ARCH_NAMES",
    "VIT_ARCHS",
    "DINOHead",
    "MultiCropWrapper",
    "VisionTransformer",
    "WeightNormLinear",
    "build_backbone",
    "build_model",
    "last_layer_parameters",
    "param_groups_for_weight_decay",
    "resnet50_backbone",
]
