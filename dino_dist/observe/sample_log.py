"""A test mode that records which samples each step trained on.

With DINO_DIST_TEST_SAMPLE_LOG=FILE set, every rank appends one JSON line per micro-batch:
the step, the world size, the rank and the labels of its samples (a test gives every sample a
unique label, so they name the samples). Exact-resume tests rebuild the global sample order
from it and compare an interrupted run with one that never stopped.
"""
from __future__ import annotations

import json
import os

import torch

ENV = "DINO_DIST_TEST_SAMPLE_LOG"


class SampleLog:
    def __init__(self, path: str, rank: int, world_size: int) -> None:
        self.path, self.rank, self.world_size = path, rank, world_size

    @classmethod
    def from_env(cls, rank: int, world_size: int) -> "SampleLog | None":
        path = os.environ.get(ENV)
        return cls(path, rank, world_size) if path else None

    def record(self, step: int, micro: int, labels: torch.Tensor) -> None:
        line = json.dumps({"step": step, "micro": micro, "world": self.world_size, "rank": self.rank,
                           "labels": labels.tolist()}) + "\n"
        # One write of one line with O_APPEND: the ranks' lines never interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
