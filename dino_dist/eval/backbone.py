"""A teacher backbone to evaluate, read from any file the project writes."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from dino_dist.export.backbone import backbone_weights, read_exported, sidecar
from dino_dist.checkpoint.reader import read_whole
from dino_dist.config import Config, config_from_dict
from dino_dist.models import build_backbone
from dino_dist.models.vit import vit_options


def backbone_from_checkpoint(checkpoint: Path, device) -> tuple[nn.Module, Config]:
    """From a training checkpoint (file or FSDP folder) or a `dino-export`ed backbone."""
    if sidecar(checkpoint).is_file():
        info = json.loads(sidecar(checkpoint).read_text())
        model = {k: info[k] for k in ("arch", "patch_size", "img_size")}
        # An export keeps no eval settings: evaluate at the resolution its position table was
        # trained at (the demo's 32 px, ImageNet's 224), as the checkpoint it came from does.
        cfg = config_from_dict({"model": model, "eval": {"image_size": info["img_size"]}})
        weights = read_exported(checkpoint)
    else:
        state = read_whole(checkpoint)
        cfg = config_from_dict(state["config"])
        weights = backbone_weights(state, "teacher")
    # The DINOv2 options as the weights show them: exports record no config of them.
    backbone = build_backbone(cfg.model.arch, cfg.model.patch_size, 0.0, cfg.model.img_size,
                              **vit_options(weights))
    backbone.load_state_dict(weights, strict=True)
    return backbone.to(device), cfg
