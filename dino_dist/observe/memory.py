"""Memory figures for the log: host resident memory and, on GPU, the allocator's view."""
from __future__ import annotations

import os
import resource

import torch

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def host_rss_mb() -> float:
    """This process's resident set size now (Linux /proc; the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES / 2**20
    except (OSError, IndexError, ValueError):
        return host_peak_rss_mb()


def host_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory on GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return host_peak_rss_mb()


def memory_values(device: torch.device) -> dict[str, float]:
    """Host RSS (now and peak); on CUDA also allocated, reserved and peak allocated memory."""
    values = {"host_rss_mb": host_rss_mb(), "host_peak_rss_mb": host_peak_rss_mb()}
    if device.type == "cuda":
        values.update(device_allocated_mb=torch.cuda.memory_allocated(device) / 2**20,
                      device_reserved_mb=torch.cuda.memory_reserved(device) / 2**20,
                      device_peak_mb=torch.cuda.max_memory_allocated(device) / 2**20)
    return values
