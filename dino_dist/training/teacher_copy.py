"""The teacher's matmul weights in the autocast dtype, copied once per pass instead of per use.

Under autocast every fp32 weight of a linear layer or convolution is cast to bf16 (fp16) at
each use, one copy kernel apiece; for the teacher, which has no gradient, autocast does not
even cache the casts. Here a working twin of the teacher holds those weights in the low
dtype and shares every other parameter and buffer with it (layer norms, embeddings, the
weight-normalised last layer, batch-norm statistics); one multi-tensor copy from the fp32
teacher refreshes the twin right before each teacher pass. The fp32 teacher stays what the
EMA updates, checkpoints save and evaluation reads.

Autocast casts with round-to-nearest-even, as the copy does, and does not recast a weight
that already has its dtype: the twin's outputs are bit-identical to the teacher's under
autocast. FSDP2 already gathers its parameters in bf16 (its mixed-precision policy), and a
compiled teacher fuses the casts into its kernels, so neither gets a twin.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

# The modules whose weights autocast casts to the low dtype (matmuls and convolutions).
_CAST_BY_AUTOCAST = (nn.Linear, nn.Conv2d)


class LowPrecisionTeacher:
    """`module()`: the teacher to run under autocast, its casts refreshed from the fp32 one."""

    def __init__(self, teacher: nn.Module, dtype: torch.dtype):
        self.teacher = teacher
        # Deep-copied with every parameter and buffer mapped to itself: the twin shares them
        # all, then gets its own low-precision weights where autocast would cast.
        shared = {id(t): t for t in (*teacher.parameters(), *teacher.buffers())}
        self.working = copy.deepcopy(teacher, memo=shared)
        self.low: list[torch.Tensor] = []  # the twin's own low-precision weights
        self.source: list[torch.Tensor] = []  # the teacher's fp32 weights they copy
        for twin in self.working.modules():
            if not isinstance(twin, _CAST_BY_AUTOCAST):
                continue
            for name, param in list(twin._parameters.items()):
                if param is None or parametrize.is_parametrized(twin, name):
                    continue
                low = nn.Parameter(param.detach().to(dtype), requires_grad=False)
                twin._parameters[name] = low
                self.low.append(low)
                self.source.append(param.detach())  # a view of the same storage

    @torch.no_grad()
    def module(self) -> nn.Module:
        torch._foreach_copy_(self.low, self.source)
        self.working.train(self.teacher.training)
        return self.working

    @staticmethod
    def applies(teacher: nn.Module, autocast_dtype: torch.dtype | None) -> bool:
        """Autocast on, and a plain (unsharded, uncompiled) teacher."""
        from torch.distributed.fsdp import FSDPModule
        if autocast_dtype is None:
            return False
        return not any(isinstance(m, FSDPModule) or getattr(m, "_compiled_call_impl", None)
                       for m in teacher.modules())
