"""`dino-export`: one checkpoint (DDP file or FSDP folder) → the teacher backbone's weights.

    dino-export RUN/checkpoints/step_00012000       [--output teacher_backbone.pth]

The output is a plain state dict under the official DINO key names (what
`facebookresearch/dino`'s pretrained files hold), so it loads with `strict=True` into
`dino_dist.models.build_backbone(...)` or the reference ViT; a small `<output>.json` beside it
records the architecture for `dino-knn --checkpoint <output>` and other tools.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from dino_dist.checkpoint.single_file import CheckpointError, atomic_write, load_checkpoint

BACKBONE_PREFIX = "backbone."


def read_training_state(path: Path) -> dict[str, Any]:
    """Whole tensors of a DDP file or an FSDP folder, in one process."""
    if path.is_dir():
        from dino_dist.checkpoint.sharded import read_full
        return read_full(path)
    return load_checkpoint(path, map_location="cpu")


def backbone_weights(state: dict[str, Any], which: str = "teacher") -> dict[str, torch.Tensor]:
    return {k[len(BACKBONE_PREFIX):]: v.detach().clone().contiguous()
            for k, v in state[which].items() if k.startswith(BACKBONE_PREFIX)}


def describe(state: dict[str, Any], source: Path, which: str) -> dict[str, Any]:
    model = state["config"]["model"]
    return {"format": "dino_dist backbone", "which": which, "arch": model["arch"],
            "patch_size": model["patch_size"], "img_size": model["img_size"],
            "step": state["step"], "epoch": state["epoch"], "source": str(source)}


def export(source: Path, output: Path, which: str = "teacher") -> tuple[dict, int]:
    state = read_training_state(source)
    weights = backbone_weights(state, which)
    info = describe(state, source, which)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda f: torch.save(weights, f))
    atomic_write(sidecar(output), lambda f: f.write(json.dumps(info, indent=1).encode()))
    return info, sum(v.numel() for v in weights.values())


def sidecar(weights_file: Path) -> Path:
    return weights_file.with_name(weights_file.name + ".json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dino-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a step_<8 digits>.pt file or an FSDP step_<8 digits> folder")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: <which>_backbone_step<N>.pth next to the run directory")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="the teacher is what DINO evaluates and publishes")
    args = parser.parse_args(argv)
    try:
        if not args.checkpoint.exists():
            raise CheckpointError(f"checkpoint '{args.checkpoint}' does not exist: check the path")
        step = int(args.checkpoint.name.split("_")[-1].split(".")[0]) \
            if args.checkpoint.name.startswith("step_") else 0
        output = args.output or args.checkpoint.parent.parent / f"{args.which}_backbone_step{step}.pth"
        info, numel = export(args.checkpoint, output, args.which)
    except (CheckpointError, OSError, KeyError) as err:
        print(f"dino-export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {output}: {info['which']} backbone of step {info['step']} ({info['arch']}, "
          f"patch {info['patch_size']}, {numel / 1e6:.2f} M parameters) under the official DINO "
          f"key names; architecture in {sidecar(output)}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
