"""Workers die with their launcher.

torchrun starts its workers in sessions of their own, so a SIGKILLed agent (the OOM killer,
`kill -9`, a wrapper's timeout) leaves them running as orphans: they keep training and saving
into the run directory that a restarted job is about to use, and workers still in start-up
retry the dead agent's store for the whole start-up timeout. A worker therefore watches its
parent: when the parent is gone (the kernel hands an orphan to init or to a subreaper, so
`getppid()` changes) the worker leaves at once with `os._exit`, abandoning whatever it was
doing. A save in flight is never committed half-done: its commit is the last rename, and the
next owner of the run directory removes what was left uncommitted.

Only processes that a launcher started are watched (torchrun, an `srun` step, any launcher
that set WORLD_SIZE > 1). A plain single `dino-train` may outlive the shell that started it
(`nohup`), as users expect.

This module imports nothing heavy: `python -m dino_dist.train` starts the watch before torch
is imported, so a launcher that dies during the imports is noticed too.
"""
from __future__ import annotations

import os
import sys
import threading
import time

POLL_S = 0.5  # how often the parent is checked: a dead launcher is noticed within a second
EXIT_LAUNCHER_GONE = 1
_WATCHED: list[int] = []  # the parent pid being watched (one watch per process)


def started_by_a_launcher(environ=os.environ) -> bool:
    """torchrun (its run id), an srun step (its step id), or a launcher of several ranks."""
    if environ.get("TORCHELASTIC_RUN_ID") or environ.get("SLURM_STEP_ID"):
        return True
    world = environ.get("WORLD_SIZE", "") or "1"
    return world.isdigit() and int(world) > 1


def watch_launcher(poll_s: float = POLL_S) -> int | None:
    """Leave this process as soon as its launcher is gone; the watched pid, or None when the
    process was not started by a launcher. Calling it again is harmless."""
    if _WATCHED or not started_by_a_launcher():
        return _WATCHED[0] if _WATCHED else None
    parent = os.getppid()
    if parent == 1:  # orphaned before this line ran (the launcher died during the imports)
        leave(parent)
    _WATCHED.append(parent)
    threading.Thread(target=_watch, args=(parent, poll_s), name="dino-dist-launcher-watch",
                     daemon=True).start()
    return parent


def _watch(parent: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent:
            leave(parent)


def leave(parent: int) -> None:
    """Exit now, without cleanup: nothing this process still holds may be written after its
    job is gone (a save in flight stays uncommitted, the next run removes it)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    line = (f"dino-train: rank {rank}: its launcher (pid {parent}) is gone; this worker stops "
            f"now, abandoning unsaved work: restart the job to resume from the newest "
            f"checkpoint\n")
    # The launcher's end of stderr may be a pipe nobody reads any more: a full one would
    # block the write forever, so the line gets a moment and the exit does not wait longer.
    writer = threading.Thread(target=_write_stderr, args=(line,), daemon=True)
    writer.start()
    writer.join(0.5)
    os._exit(EXIT_LAUNCHER_GONE)


def _write_stderr(line: str) -> None:
    try:
        os.write(2, line.encode())
    except OSError:
        pass
