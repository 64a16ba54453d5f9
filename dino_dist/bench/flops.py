"""Model FLOPs per step, counted by torch's FLOP counter, and model FLOPs utilisation."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts).
HALF_PRECISION_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12}


def count_flops(run_once, *args) -> int:
    """FLOPs of one call of `run_once(*args)` (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run_once(*args)
    return counter.get_total_flops()


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for the step's matmul precision, when we know it."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in HALF_PRECISION_PEAK.items() if key in name), None)


def mfu(flops_per_step: int, seconds_per_step: float, peak: float | None) -> float | None:
    if not peak or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak
