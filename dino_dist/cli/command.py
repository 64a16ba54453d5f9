"""What every command does the same way: one error line and exit code 2 for a user mistake,
its written files listed one per line, the process group around work done on every rank."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from dino_dist.distributed.env import DistEnv, init_distributed, read_launch_env, teardown
from dino_dist.errors import USER_ERRORS, one_line


def report_error(prog: str, err: Exception | str) -> int:
    """`prog: error: ...` on stderr (the message names the problem and the fix); exit code 2."""
    print(f"{prog}: error: {one_line(err) if isinstance(err, Exception) else err}", file=sys.stderr)
    return 2


def list_written(paths: Iterable[Path]) -> int:
    """Print each written file on its own line (scripts read them); exit code 0."""
    for path in paths:
        print(path)
    return 0


def on_every_rank(prog: str, device: str, work: Callable[[DistEnv], str]) -> int:
    """Run `work` in every process of the job (one plain process, or each torchrun rank) with
    the process group around it; a user mistake ends in one line and exit code 2 on every
    rank, and the line `work` returns is printed once, by rank 0."""
    try:
        env = init_distributed(device)
        line = work(env)
    except USER_ERRORS as err:
        return report_error(prog, err)
    finally:
        teardown()
    if env.is_main:
        print(line)
    return 0


def is_extra_rank() -> bool:
    """True in every process but the first when a one-process command is started under
    torchrun (or as a multi-task SLURM step): those leave at once, since they would only
    race rank 0 for the same output files."""
    return read_launch_env()[0] != 0
