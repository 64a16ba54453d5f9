"""Wall time of calls on a device: the queue is drained before the clock starts and stops."""
from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run_once: Callable[[], None], calls: int, device: torch.device) -> float:
    """Seconds for `calls` calls of `run_once`, the device's queued work included."""
    synchronize(device)
    began = time.perf_counter()
    for _ in range(calls):
        run_once()
    synchronize(device)
    return time.perf_counter() - began
