"""`python -m dino_dist.train`: the training entry that torchrun, SLURM and the docs name.

The command itself is `dino_dist.cli.train`; this module keeps the documented module path.
"""
from dino_dist.cli.train import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
