"""The engine's phase marks, which cost nothing in training.

The engine calls `clock.mark(phase)` at the end of each phase of a step. Only dino-bench
times them (dino_dist.bench.phases.PhaseClock, which synchronises the device at each mark);
training gets IdleClock, so its steps never wait for the device to be timed.
"""
from __future__ import annotations


class IdleClock:
    def mark(self, phase: str) -> None:
        return None  # deliberately nothing: phases are only timed under dino-bench
