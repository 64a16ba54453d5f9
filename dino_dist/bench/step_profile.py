"""Where an ordinary step's time goes, from torch.profiler: `dino-bench --profile N`.

On CUDA: the kernels launched per step, the share of the step's wall time in which the GPU
runs at least one of them (what is left is the host launching, waiting or loading), and the
kernels with the most GPU time. On a CPU (no device queue) the top aten ops by their own CPU
time stand in, so the part can be run and checked without a GPU; the launch count there is
dino-bench's `aten_ops_per_step`.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from dino_dist.bench.timing import timed

TOP = 12


def profile_steps(run_once: Callable[[], None], steps: int, device: torch.device) -> dict:
    """Profile `steps` calls of `run_once` (one optimizer step each)."""
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        wall_us = timed(run_once, steps, device) * 1e6
    events = prof.events()
    report = {"steps": steps, "ms_per_step": round(wall_us / steps / 1e3, 3)}
    if on_cuda:
        report.update(_device_figures(events, steps, wall_us))
    else:
        report.update(top_cpu_ops_ms_per_step=_top_cpu_ops(prof, steps))
    return report


def _device_figures(events, steps: int, wall_us: float) -> dict:
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
    per_name: dict[str, float] = defaultdict(float)
    for kernel in kernels:
        per_name[kernel.name] += kernel.time_range.elapsed_us()
    top = sorted(per_name.items(), key=lambda item: -item[1])[:TOP]
    busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in device_events])
    return {"kernels_per_step": round(len(kernels) / steps, 1),
            "device_busy_share": round(min(1.0, busy_us / wall_us), 4),
            "device_ms_per_step": round(busy_us / steps / 1e3, 3),
            "top_kernels_ms_per_step": {name[:80]: round(us / steps / 1e3, 3) for name, us in top}}


def _top_cpu_ops(prof, steps: int) -> dict[str, float]:
    averages = [a for a in prof.key_averages() if a.key.startswith("aten::")]
    averages.sort(key=lambda a: -a.self_cpu_time_total)
    return {a.key: round(a.self_cpu_time_total / steps / 1e3, 3) for a in averages[:TOP]}


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (kernels on several streams may overlap)."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        covered += end - max(start, reach)
        reach = end
    return covered
