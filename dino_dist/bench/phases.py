"""Per-phase timing of the training step, for the benchmark only.

The engine calls `clock.mark(phase)` at each phase boundary: "the time since the previous
mark was spent in `phase`". Training runs with the engine's default clock, whose mark does
nothing; the benchmark builds its engine with a PhaseClock that records only between
`start()` and `stop()` (a separate, shorter pass), because the device synchronisation it
needs for honest GPU times would itself slow the timed steps.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

PHASES = ("data", "teacher_forward", "student_forward", "loss", "backward", "communication",
          "clip", "optimizer", "ema")


class PhaseClock:
    def __init__(self, device: torch.device):
        self.synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self.last = time.perf_counter()
        self.running = False

    def start(self) -> None:
        self.synchronize()
        self.last = time.perf_counter()
        self.running = True

    def stop(self) -> None:
        self.running = False

    def mark(self, phase: str) -> None:
        if not self.running:
            return
        self.synchronize()
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now

    def shares(self) -> dict[str, float]:
        """Share of the measured time per phase; 'other' is whatever no mark claimed."""
        total = sum(self.seconds.values())
        return {name: round(spent / total, 4) for name, spent in self.seconds.items()} if total else {}
