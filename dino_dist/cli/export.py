"""`dino-export`: one checkpoint (DDP file or FSDP folder) → the teacher backbone's weights.

    dino-export RUN/checkpoints/step_00012000       [--output teacher_backbone.pth]

The output is a plain state dict under the official DINO key names (what
`facebookresearch/dino`'s pretrained files hold), so it loads with `strict=True` into
`dino_dist.models.build_backbone(...)` or the reference ViT; a small `<output>.json` beside it
records the architecture for `dino-knn --checkpoint <output>` and other tools.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dino_dist.checkpoint.export import export, sidecar
from dino_dist.errors import CheckpointError


def report(output: Path, info: dict, numel: int) -> int:
    print(f"wrote {output}: {info['which']} backbone of step {info['step']} ({info['arch']}, "
          f"patch {info['patch_size']}, {numel / 1e6:.2f} M parameters) under the official DINO "
          f"key names; architecture in {sidecar(output)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dino-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a step_<8 digits>.pt file or an FSDP step_<8 digits> folder")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: <which>_backbone_step<N>.pth next to the run directory")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="the teacher is what DINO evaluates and publishes")
    args = parser.parse_args(argv)
    try:
        step = int(args.checkpoint.name.split("_")[-1].split(".")[0]) \
            if args.checkpoint.name.startswith("step_") else 0
        output = args.output or args.checkpoint.parent.parent / f"{args.which}_backbone_step{step}.pth"
        info, numel = export(args.checkpoint, output, args.which)
    except (CheckpointError, OSError, KeyError) as err:
        print(f"dino-export: error: {err}", file=sys.stderr)
        return 2
    return report(output, info, numel)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
