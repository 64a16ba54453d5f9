"""A checkpoint's backbone as a plain state dict under the official DINO key names.

The weights are what `facebookresearch/dino`'s pretrained files hold, so they load with
`strict=True` into `dino_dist.models.build_backbone(...)` or the reference ViT; a small
`<output>.json` beside them records the architecture for `dino-knn` and other tools.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dino_dist.checkpoint.files import atomic_write
from dino_dist.checkpoint.reader import read_whole

BACKBONE_PREFIX = "backbone."


def backbone_weights(state: dict[str, Any], which: str = "teacher") -> dict[str, torch.Tensor]:
    return {k[len(BACKBONE_PREFIX):]: v.detach().clone().contiguous()
            for k, v in state[which].items() if k.startswith(BACKBONE_PREFIX)}


def describe(state: dict[str, Any], source: Path, which: str) -> dict[str, Any]:
    model = state["config"]["model"]
    return {"format": "dino_dist backbone", "which": which, "arch": model["arch"],
            "patch_size": model["patch_size"], "img_size": model["img_size"],
            "step": state["step"], "epoch": state["epoch"], "source": str(source)}


def export(source: Path, output: Path, which: str = "teacher") -> tuple[dict, int]:
    state = read_whole(source)
    weights = backbone_weights(state, which)
    info = describe(state, source, which)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda f: torch.save(weights, f))
    atomic_write(sidecar(output), lambda f: f.write(json.dumps(info, indent=1).encode()))
    return info, sum(v.numel() for v in weights.values())


def sidecar(weights_file: Path) -> Path:
    return weights_file.with_name(weights_file.name + ".json")
