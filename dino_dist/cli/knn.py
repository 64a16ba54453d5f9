"""`dino-knn`: k-NN top-1/top-5 of a checkpoint's teacher backbone on labelled folders.

    dino-knn --checkpoint RUN/checkpoints/step_00001000.pt --train-data DIR --val-data DIR
    torchrun --nproc_per_node=4 -m dino_dist.cli.knn ...   # feature extraction sharded
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dino_dist.cli.command import on_every_rank
from dino_dist.data import LabelledImageDataset, eval_transform
from dino_dist.distributed.env import DistEnv
from dino_dist.eval.backbone import backbone_from_checkpoint
from dino_dist.eval.knn import knn_accuracy


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="dino-knn", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--train-data", required=True,
                        help="labelled images: an ImageFolder tree or a labelled shard set (folder, pattern, s3://)")
    parser.add_argument("--val-data", required=True, help="labelled images, as --train-data")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: the checkpoint's eval.image_size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser.parse_args(argv)


def knn(args: argparse.Namespace, env: DistEnv) -> str:
    backbone, cfg = backbone_from_checkpoint(args.checkpoint, env.device)
    transform = eval_transform(args.image_size or cfg.eval.image_size)
    train_set = LabelledImageDataset(args.train_data, transform)
    val_set = LabelledImageDataset(args.val_data, transform)
    top1, top5 = knn_accuracy(backbone, train_set, val_set, env, args.k, args.temperature,
                              args.batch_size, args.num_workers)
    return (f"k-NN k={args.k} T={args.temperature}: top-1 {top1:.2f}% top-5 {top5:.2f}% "
            f"({len(val_set)} val images, {len(train_set)} train images)")


def main(argv=None) -> int:
    args = parse_args(argv)
    return on_every_rank("dino-knn", args.device, lambda env: knn(args, env))


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
