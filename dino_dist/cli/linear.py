"""`dino-linear`: top-1/top-5 of a linear classifier on a checkpoint's frozen teacher features.

    dino-linear --checkpoint RUN/checkpoints/step_00001000.pt --train-data DIR --val-data DIR
    torchrun --nproc_per_node=4 -m dino_dist.cli.linear ...   # extraction and training sharded
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dino_dist.cli.command import on_every_rank
from dino_dist.distributed.env import DistEnv
from dino_dist.eval.linear import ProbeSettings, linear_probe
from dino_dist.eval.linear_features import FeatureSettings
from dino_dist.observe.metrics import setup_logging


def at_least(minimum: int):
    def whole_number(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, "
                                             f"got {text!r}")
        return int(text)
    return whole_number


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="dino-linear", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a training checkpoint (file or FSDP folder) or a dino-export file")
    parser.add_argument("--train-data", required=True,
                        help="labelled images: an ImageFolder tree or a labelled shard set (folder, pattern, s3://)")
    parser.add_argument("--val-data", required=True, help="labelled images, as --train-data")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="default: RUN/linear/<checkpoint name>, or ./linear_probe/<name>")
    parser.add_argument("--epochs", type=at_least(1), default=100)
    parser.add_argument("--lr", type=float, default=0.001,
                        help="for a batch of 256, scaled linearly")
    parser.add_argument("--batch-size", type=at_least(1), default=256, help="global, over all ranks")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--n-last-blocks", type=at_least(1), default=None,
                        help="ViT CLS tokens of the last n blocks (default 4; 1 for vit_base)")
    parser.add_argument("--avgpool", action="store_true", help="add the mean patch token (ViT)")
    parser.add_argument("--train-views", type=at_least(0), default=0,
                        help="random-resized-crop + flip views cached per training image; "
                             "0 (default): one resize + centre crop, as for validation")
    parser.add_argument("--image-size", type=at_least(1), default=None,
                        help="default: the checkpoint's eval.image_size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is visible: use --device auto or cpu")
    return args


def default_output_dir(checkpoint: Path) -> Path:
    """RUN/linear/<name> for a checkpoint under a run's checkpoints/ folder, else
    ./linear_probe/<name>: one folder per checkpoint, so each probe resumes on its own."""
    checkpoint = checkpoint.resolve()
    run = next((p.parent for p in checkpoint.parents if p.name == "checkpoints"), None)
    return (run / "linear" if run else Path("linear_probe")) / checkpoint.stem


def main(argv=None) -> int:
    args = parse_args(argv)
    return on_every_rank("dino-linear", args.device, lambda env: probe(args, env))


def probe(args: argparse.Namespace, env: DistEnv) -> str:
    output_dir = args.output_dir or default_output_dir(args.checkpoint)
    setup_logging(None, env.is_main)  # the probe adds its log.txt once the inputs are good
    features = FeatureSettings(args.n_last_blocks, args.avgpool, args.image_size,
                               args.train_views, args.seed)  # None: the checkpoint's choice
    settings = ProbeSettings(args.epochs, args.batch_size, args.lr, args.weight_decay, args.seed)
    result = linear_probe(args.checkpoint, args.train_data, args.val_data, output_dir,
                          features, settings, env, args.num_workers)
    return (f"linear probe, epoch {result['epoch']}: top-1 {result['val_top1']:.2f}% top-5 "
            f"{result['val_top5']:.2f}% (val); output in {output_dir}")


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
