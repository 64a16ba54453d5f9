#!/usr/bin/env python
"""Submit a dino-train run to SLURM through submitit (same as the `dino-submit` command).

    python launch/submit.py --config configs/vit_small_16.yaml --nodes 4 --gpus-per-node 8 \
        --partition P --timeout-min 4320 data.path=/data/imagenet/train

`python launch/submit.py --help` lists the options; see the README's SLURM section.
"""
from dino_dist.cli.submit import cli

if __name__ == "__main__":
    cli()
