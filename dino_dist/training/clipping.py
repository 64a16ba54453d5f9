"""Gradient norms and clipping, for plain and sharded (FSDP) gradients alike.

Norms are whole-parameter norms even when a rank holds a shard: the local squared norms are
summed across ranks in one all-reduce, so every rank clips by the same factor and reaches the
same verdict on a non-finite norm.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dino_dist.distributed.collectives import all_reduce_sum_


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's shards of DTensors (FSDP), plain tensors as they are."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def gradient_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's gradient norm; for sharded gradients, over the whole parameter."""
    if not isinstance(grads[0], DTensor):
        return torch._foreach_norm(grads)
    squares = torch.stack(torch._foreach_norm(local_tensors(grads))) ** 2
    return list(all_reduce_sum_(squares).sqrt().unbind())


def clip_gradients(params: list[nn.Parameter], clip_grad: float, mode: str = "per_param",
                   stats=None) -> torch.Tensor:
    """Clip the gradients of `params` in place; returns their total norm before clipping (a
    device scalar, zero when none has a gradient). `clip_grad` <= 0 clips nothing.

    mode "per_param" is DINO's rule: each parameter's gradient is capped at norm clip_grad
    on its own; "global" scales all of them by one factor. `stats`
    (observe.diagnostics.StepStatistics) receives the per-parameter norms on logging steps."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        device = params[0].device if params else None
        return torch.zeros((), device=device)
    grads = [p.grad for p in with_grad]
    norms = gradient_norms(grads)
    if stats is not None:
        stats.add_grad_norms(params, norms)
    total_norm = torch.linalg.vector_norm(torch.stack(norms))
    if clip_grad <= 0:
        return total_norm
    grads = local_tensors(grads)  # scaling a shard in place scales that part of the parameter
    if mode == "global":
        coef = torch.clamp(clip_grad / (total_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
    else:
        coefs = torch.clamp(clip_grad / (torch.stack(norms) + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coefs.unbind())
    return total_norm
