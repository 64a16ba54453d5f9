"""`srun python -m dino_dist.cli.slurm_entry [dino-train arguments]`: dino-train for SLURM tasks.

The same entry as `python -m dino_dist.cli.train`, with the stop handlers and the launcher watch
installed before torch is imported: a USR2 or TERM in those first seconds of a (re)started job
would otherwise kill the task with the default action instead of stopping it at its first
step, and a task whose srun step is gone leaves at once instead of after its imports.
"""
from __future__ import annotations

import sys

from dino_dist.distributed.lifeline import watch_launcher
from dino_dist.distributed.stop import install_stop_handlers


def cli() -> None:
    install_stop_handlers(include_term=True)
    watch_launcher()
    from dino_dist.cli.train import main

    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
