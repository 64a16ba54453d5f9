"""`dino-attention`: PNGs of the last block's CLS attention of a checkpoint's teacher ViT.

    dino-attention --checkpoint RUN/checkpoints/step_00001000.pt photo.jpg more_photos/
    dino-attention --checkpoint RUN/checkpoints/step_00001000 --image-size 480 --output-dir D x.png

Per image, a folder <output-dir>/<image name>/ with image.png (as the model saw it), head_N.png
(each head's map), mean.png, mask.png (the patches holding --threshold of the mean map's
attention mass, over the image) and grid.png (all of them side by side).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dino_dist.cli.command import is_extra_rank, list_written, report_error
from dino_dist.distributed.env import pick_device
from dino_dist.errors import CheckpointError, DataError
from dino_dist.eval.attention import (DEFAULT_KEEP, image_files, require_vit,
                                      write_attention_pngs)
from dino_dist.eval.backbone import backbone_from_checkpoint

PROG = "dino-attention"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a DDP file, an FSDP folder or a dino-export file")
    parser.add_argument("--output-dir", type=Path, default=Path("attention"))
    parser.add_argument("--image-size", type=int, default=None,
                        help="shorter side in px (default: each image's own size); both sides "
                             "are rounded to multiples of the patch size")
    parser.add_argument("--threshold", type=float, default=DEFAULT_KEEP,
                        help="share of the attention mass the mask keeps (DINO: 0.6)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.image_size is not None and args.image_size <= 0:
        parser.error(f"--image-size must be a positive number of pixels, got {args.image_size}")
    if not 0 < args.threshold <= 1:
        parser.error(f"--threshold is a share of the attention mass, in (0, 1]; got "
                     f"{args.threshold}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no GPU is visible: use --device cpu (or auto)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if is_extra_rank():
        return 0
    device = pick_device(args.device, 0)
    try:
        files = image_files(args.images)
        backbone, _cfg = backbone_from_checkpoint(args.checkpoint, device)
        vit = require_vit(backbone, args.checkpoint)
        written = write_attention_pngs(vit, files, args.output_dir, args.image_size,
                                       args.threshold, device)
    except (CheckpointError, DataError) as err:
        return report_error(PROG, err)
    return list_written(written)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
