"""A process-wide request to stop training at the next optimizer-step boundary, and the
signal handlers that make it.

Signal handlers (preemption, time limits) only set this flag: they run between bytecodes on
the main thread, maybe inside a collective, and must not touch the process group or files. The engine folds the flag into
the one reduction it already does per step, so every rank sees the same answer at the same
step, rank 0 saves, and all ranks leave the loop together.
"""
from __future__ import annotations

import signal


class StopRequest:
    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        """Ask for a stop; the first reason wins (a second signal does not overwrite it)."""
        if self.reason is None:
            self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def clear(self) -> None:
        self.reason = None


STOP_REQUEST = StopRequest()


def _request_stop(signum, _frame) -> None:
    STOP_REQUEST.request(signal.Signals(signum).name)


def install_stop_handlers(include_term: bool) -> None:
    """USR2 (SLURM's/submitit's warning signal) always; TERM where a scheduler sends it.

    TERM is left alone for plain and torchrun processes: torchrun stops the survivors of a
    failed worker with TERM, and they must not wait in a collective for a dead peer.
    """
    signals = (signal.SIGUSR2, signal.SIGTERM) if include_term else (signal.SIGUSR2,)
    for sig in signals:
        signal.signal(sig, _request_stop)


def ignore_stop_signals() -> None:
    """Once training has ended there is nothing left to save, and a late USR2/TERM must not
    kill the exit: Python restores the default actions (terminate) of its own handlers while
    shutting down, but leaves ignored signals ignored."""
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
