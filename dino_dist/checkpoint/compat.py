"""Whether a checkpoint fits the model a run builds, told before anything is loaded."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dino_dist.errors import CheckpointError


# Settings that fix tensor shapes: a checkpoint cannot be loaded into a model built otherwise.
SHAPE_KEYS = ("model.arch", "model.patch_size", "model.img_size", "model.out_dim",
              "model.use_bn_in_head", "model.norm_last_layer", "model.head_hidden_dim",
              "model.head_bottleneck_dim")


def check_compatible(path: Path, saved_config: dict[str, Any], config: dict[str, Any]) -> None:
    """CheckpointError naming every shape-fixing key that differs, before anything is loaded."""
    def value(cfg: dict[str, Any], dotted: str):
        section, key = dotted.split(".")
        return cfg.get(section, {}).get(key)

    differing = [f"{k}: {value(saved_config, k)!r} in the checkpoint, {value(config, k)!r} now"
                 for k in SHAPE_KEYS if value(saved_config, k) != value(config, k)]
    if differing:
        raise CheckpointError(
            f"checkpoint '{path}' was trained with another model ({'; '.join(differing)}): "
            f"use the checkpoint's settings, or a new train.output_dir to start afresh")
