"""A process-wide request to stop training at the next optimizer-step boundary.

Signal handlers (preemption, time limits) only set this flag: they run between bytecodes on
the main thread and must not touch the process group or files. The engine folds the flag into
the one reduction it already does per step, so every rank sees the same answer at the same
step, rank 0 saves, and all ranks leave the loop together.
"""
from __future__ import annotations


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
