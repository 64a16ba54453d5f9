"""Aten ops dispatched per call: a proxy for the kernels a GPU step launches, countable on a CPU.

Each aten op that computes (not a view or a metadata query) launches at least one kernel on
a GPU; a small model's step is bound by how many it launches rather than by its FLOPs, so the
count shows, without a GPU, whether a change adds or removes launches. The counter sits below
autograd, so the backward's ops are counted too.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that touch no data: allocation and aliasing; they launch nothing (views are found by
# their schema).
_NO_KERNEL_OPS = {torch.ops.aten.detach, torch.ops.aten.alias, torch.ops.aten.lift_fresh,
                  torch.ops.aten._unsafe_view, torch.ops.aten.empty, torch.ops.aten.empty_like,
                  torch.ops.aten.empty_strided, torch.ops.aten.set_, torch.ops.aten.is_same_size}


def _launches_kernel(func) -> bool:
    return not func.is_view and func.overloadpacket not in _NO_KERNEL_OPS


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside it that compute, by name (`counts`) and in all (`total`)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _launches_kernel(func):
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def top(self, n: int = 10) -> dict[str, int]:
        return dict(self.counts.most_common(n))


def count_ops(run_once: Callable[[], object]) -> OpCounter:
    """The ops of one call of `run_once`."""
    counter = OpCounter()
    with counter:
        run_once()
    return counter
