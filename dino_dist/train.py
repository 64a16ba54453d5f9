"""`python -m dino_dist.train`: the training entry that torchrun, SLURM and the docs name.

The command itself is `dino_dist.cli.train`; this module keeps the documented module path.
"""
# Before the heavy imports: a launcher that dies while torch loads is noticed too.
from dino_dist.distributed.lifeline import watch_launcher

watch_launcher()

from dino_dist.cli.train import cli, main  # noqa: E402

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
