"""Collapse and stability statistics of one optimizer step, from tensors the step already has.

Collected only on logging steps (the loop hands the engine a StepStatistics then, None
otherwise), so ordinary steps pay nothing. The per-rank sums ride in the engine's one
all-reduce of the step, so the figures are over the *global* batch without another collective:

- teacher entropy: mean over teacher rows of H(softmax((t - center) / T_t)), and its ratio to
  ln(out_dim) — 1 means the teacher outputs are uniform (uniform collapse).
- student-teacher KL: the DINO loss is a cross-entropy, CE = H(teacher) + KL(teacher||student),
  averaged over the same (teacher crop, student crop) pairs in which every teacher row appears
  equally often, so the mean KL is exactly loss - mean teacher entropy.
- prototypes in use: how many distinct teacher argmax prototypes the global batch hit; 1 or 2
  means every image maps to the same output (dimensional collapse).
- gradient norms per parameter group (backbone, head, last layer) before clipping, after
  unscaling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GRAD_GROUPS = ("backbone", "head", "last_layer")


def teacher_entropy_sum(teacher_out: torch.Tensor, center: torch.Tensor,
                        teacher_temp: float) -> torch.Tensor:
    """Sum over rows of the entropy (nats) of the centred, sharpened teacher distribution."""
    logp = F.log_softmax((teacher_out.float() - center) / teacher_temp, dim=-1)
    return -(logp.exp() * logp).sum()


def prototype_counts(teacher_out: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """How many rows pick each prototype as their argmax (float, so it can be all-reduced)."""
    winners = (teacher_out.float() - center).argmax(dim=-1)
    return torch.bincount(winners, minlength=teacher_out.shape[-1]).float()


def parameter_groups(student: nn.Module, trainable: list[nn.Parameter],
                     last_layer: list[nn.Parameter]) -> list[int]:
    """Index into GRAD_GROUPS for each trainable parameter, in `trainable`'s order."""
    last_ids = {id(p) for p in last_layer}
    head_ids = {id(p) for name, p in student.named_parameters() if name.startswith("head.")}
    return [2 if id(p) in last_ids else 1 if id(p) in head_ids else 0 for p in trainable]


class StepStatistics:
    """Accumulates one optimizer step's statistics on this rank; the engine reduces them."""

    def __init__(self, out_dim: int, groups: list[int], device: torch.device):
        self.out_dim, self.device = out_dim, device
        self.groups = torch.tensor(groups, dtype=torch.long)
        self.reset()

    def reset(self) -> None:
        # [prototype counts (out_dim) | entropy sum | teacher rows]
        self.local = torch.zeros(self.out_dim + 2, device=self.device)
        self.reduced: torch.Tensor | None = None
        self.grad_norms: torch.Tensor | None = None

    @torch.no_grad()
    def add_teacher(self, teacher_out: torch.Tensor, center: torch.Tensor,
                    teacher_temp: float) -> None:
        self.local[: self.out_dim] += prototype_counts(teacher_out, center)
        self.local[-2] += teacher_entropy_sum(teacher_out, center, teacher_temp)
        self.local[-1] += teacher_out.shape[0]

    @torch.no_grad()
    def add_grad_norms(self, trainable: list[nn.Parameter], norms: list[torch.Tensor]) -> None:
        """`norms` are the norms of the gradients of `trainable` that have one, in order."""
        has_grad = torch.tensor([p.grad is not None for p in trainable], dtype=torch.bool)
        groups = self.groups[has_grad].to(norms[0].device)
        squares = torch.stack(norms).float() ** 2
        per_group = torch.zeros(len(GRAD_GROUPS), device=squares.device)
        self.grad_norms = per_group.index_add_(0, groups, squares).sqrt()

    def reduction_part(self) -> torch.Tensor:
        return self.local

    def take_reduced(self, reduced: torch.Tensor) -> torch.Tensor:
        """Keep this object's head of the all-reduced buffer; return the rest."""
        self.reduced = reduced[: self.local.numel()]
        return reduced[self.local.numel():]

    def read(self, loss: float) -> dict[str, float]:
        """The step's figures (host floats): call after the engine's finish_step."""
        if self.reduced is None:
            return {}
        reduced = self.reduced.double().cpu()
        rows = max(float(reduced[-1]), 1.0)
        entropy = float(reduced[-2]) / rows
        log_k = math.log(self.out_dim)
        used = int(torch.count_nonzero(reduced[: self.out_dim]))
        values = {"teacher_entropy": entropy, "entropy_ratio": entropy / log_k,
                  "kl": loss - entropy, "loss_ratio": loss / log_k,
                  "prototypes_used": used, "prototype_share": used / min(rows, self.out_dim)}
        if self.grad_norms is not None:
            for name, norm in zip(GRAD_GROUPS, self.grad_norms.tolist()):
                values[f"grad_norm_{name}"] = norm
        return values


def state_values(center: torch.Tensor, scaler: torch.amp.GradScaler) -> dict[str, float]:
    """Figures that live in the training state: the center's norm and, under fp16, the scale."""
    values = {"center_norm": float(center.float().norm())}
    if scaler.is_enabled():
        values["grad_scale"] = float(scaler.get_scale())
    return values
