"""Sinkhorn-Knopp teacher assignment (dinov2's `sinkhorn_knopp_teacher`), over all ranks.

The engine calls it once per optimizer step on this rank's teacher logits of the whole step
(every micro-batch concatenated), so the assignment is that of the step's batch over all
ranks, whatever the accumulation or the world size.

Same math as dinov2, three deliberate differences:
- Safe in float32: before exp, each prototype's logits are shifted by their largest value
  over all ranks. dinov2 exponentiates the raw logits / T, which overflows to inf (and then
  NaN) once a logit / T passes ~88. A per-prototype factor is exact: the first step divides
  every prototype's row by its sum, which cancels any factor common to the row (a single
  global max would be exact too, but can underflow a whole row to zero -> 0 / 0).
- Ranks may hold different numbers of rows. dinov2's cls-token version assumes
  B = rows * world_size; here no B is needed at all (see below), so nothing assumes it.
- Always float32, whatever the input dtype.

Why no totals: dinov2 divides by the grand total, by K after each row normalisation, by B
after each column normalisation and multiplies by B at the end. Each of those is a constant
factor that the next normalisation cancels, and the final `* B` undoes the last `/ B`; what
remains is "rows to equal sums, columns to equal sums", repeated, then columns summing to 1.
Leaving them out saves the all-reduce of the total and of the row count, and keeps the
values near 1 instead of near 1 / (K * B). tests/test_dinov2_losses.py checks this against
the official formulation, including unequal row counts per rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _global_prototype_peak(scaled: torch.Tensor) -> torch.Tensor:
    """The largest scaled logit of each prototype over every rank's rows: [K]."""
    if scaled.shape[0] == 0:  # a rank with no rows must still join the collective
        peak = scaled.new_full((scaled.shape[1],), float("-inf"))
    else:
        peak = scaled.amax(dim=0)
    if _distributed():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float,
                   iterations: int = 3) -> torch.Tensor:
    """Teacher probabilities [n_local, K] (float32, each row sums to 1) for this rank's rows.

    `logits` [n_local, K] are this rank's rows; the prototype (column) sums are taken over
    all ranks, so every rank must call it, with the same K, `temperature` and `iterations`
    (1 + `iterations` all-reduces of K floats). A rank may hold zero rows.
    """
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs at least one iteration, got {iterations}")
    scaled = logits.detach().float() / temperature
    # q is dinov2's Q transposed: one row per sample, one column per prototype.
    q = torch.exp(scaled - _global_prototype_peak(scaled))
    for _ in range(iterations):
        prototype_mass = q.sum(dim=0)
        if _distributed():
            dist.all_reduce(prototype_mass, op=dist.ReduceOp.SUM)
        q /= prototype_mass  # every prototype gets the same total weight
        q /= q.sum(dim=1, keepdim=True)  # every sample's weights sum to 1
    return q
