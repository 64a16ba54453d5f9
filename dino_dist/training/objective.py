"""What the student is trained on: the DINO term on CLS tokens and, as options of the same
recipe (DINOv2), Sinkhorn-Knopp targets, the KoLeo regulariser and the iBOT masked-patch term.

Targets. "center": each micro-batch's teacher outputs, centred by the EMA center of earlier
steps and sharpened (DINO). "sinkhorn_knopp": an equipartition over the whole optimizer
step's teacher outputs, all ranks and micro-batches together, so k micro-batches of B/k give
the targets of one batch of B (the engine runs every teacher pass of the step first).

KoLeo, scope "global": nearest neighbours over the whole step's global-crop CLS features, all
ranks and micro-batches, so its value and gradient do not depend on how the batch is split
(training.koleo: each rank's gradient reaches its own rows, and the rows whose neighbour is
one of them). Scope "per_rank" is DINOv2's own form, within each micro-batch on each rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dino_dist.distributed.collectives import all_gather_rows
from dino_dist.models.patch_masks import PatchMasks
from dino_dist.training.ibot_loss import IBOTCenter, ibot_patch_loss
from dino_dist.training.koleo import KoLeoNeighbours, koleo_loss
from dino_dist.training.loss import DINOLoss
from dino_dist.training.sinkhorn import sinkhorn_knopp


@dataclass
class Targets:
    cls: torch.Tensor  # [global crops x B, out_dim] teacher probabilities
    patch: torch.Tensor | None = None  # [masked tokens, patch out_dim] (iBOT)


@dataclass
class LossParts:
    """Each term's value before its weight (detached); None when the term is off."""
    dino: torch.Tensor
    koleo: torch.Tensor | None = None
    ibot: torch.Tensor | None = None


@dataclass(frozen=True)
class ObjectiveSettings:
    n_global_crops: int = 2
    centering: str = "center"  # or "sinkhorn_knopp"
    sinkhorn_iterations: int = 3
    koleo_weight: float = 0.0
    koleo_scope: str = "global"  # or "per_rank"
    ibot_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "ObjectiveSettings":
        return cls(cfg.data.global_crops_number, cfg.loss.centering,
                   cfg.loss.sinkhorn_iterations, cfg.loss.koleo_weight, cfg.loss.koleo_scope,
                   cfg.ibot.weight)

    @property
    def whole_step_targets(self) -> bool:
        return self.centering == "sinkhorn_knopp"

    @property
    def global_koleo(self) -> bool:
        return self.koleo_weight > 0 and self.koleo_scope == "global"


class KoLeoStep:
    """One optimizer step's KoLeo neighbours, per global crop, over every rank's rows of every
    micro-batch. Global row order: rank, then micro-batch, then image."""

    def __init__(self, features: list[torch.Tensor], n_global_crops: int):
        """`features`: this rank's global-crop CLS features of each micro-batch of the step,
        [global crops x B, dim] each (detached); every rank holds as many of the same size."""
        self.micro_batches, self.n_global_crops = len(features), n_global_crops
        self.batch = features[0].shape[0] // n_global_crops
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        per_crop = [torch.cat([f[c * self.batch:(c + 1) * self.batch] for f in features])
                    for c in range(n_global_crops)]
        self.neighbours = [KoLeoNeighbours(all_gather_rows(rows.float())) for rows in per_crop]

    def term(self, global_cls: torch.Tensor, micro_index: int) -> torch.Tensor:
        """This micro-batch's KoLeo term, scaled as a per-micro-batch mean: the engine weights
        each micro-batch by 1/k and DDP averages the W ranks, so k x W x its share of the loss
        gives the whole batch's value, and the gradient of that loss, in sum."""
        first = (self.rank * self.micro_batches + micro_index) * self.batch
        rows = torch.arange(first, first + self.batch, device=global_cls.device)
        total = sum(self.neighbours[c].surrogate(
            global_cls[c * self.batch:(c + 1) * self.batch].float(), rows)
            for c in range(self.n_global_crops))
        return total * (self.micro_batches * self.world_size)


@dataclass
class Objective:
    settings: ObjectiveSettings
    dino_loss: DINOLoss
    patch_center: IBOTCenter | None = None

    @property
    def student_temp(self) -> float:
        return self.dino_loss.student_temp

    @property
    def n_global_crops(self) -> int:
        return self.settings.n_global_crops

    def centered(self, teacher_cls: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return self.dino_loss.teacher_probabilities(teacher_cls, teacher_temp)

    @torch.no_grad()
    def targets(self, teachers: list, teacher_temp: float) -> list[Targets]:
        """The targets of the step's micro-batches (TeacherOutputs each): per micro-batch with
        the center, or by Sinkhorn-Knopp over all of them (and all ranks) at once."""
        if not self.settings.whole_step_targets:
            return [Targets(self.centered(t.cls, teacher_temp),
                            None if t.patches is None
                            else self.patch_center.probabilities(t.patches, teacher_temp))
                    for t in teachers]
        cls = self._sinkhorn_split([t.cls for t in teachers], teacher_temp)
        if teachers[0].patches is None:
            return [Targets(c) for c in cls]
        patches = self._sinkhorn_split([t.patches for t in teachers], teacher_temp)
        return [Targets(c, p) for c, p in zip(cls, patches)]

    def _sinkhorn_split(self, logits: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        assigned = sinkhorn_knopp(torch.cat(logits), teacher_temp,
                                  self.settings.sinkhorn_iterations)
        return list(assigned.split([len(part) for part in logits]))

    def loss(self, out, targets: Targets, masks: PatchMasks | None, n_crops: int,
             koleo: tuple[KoLeoStep, int] | None = None) -> tuple[torch.Tensor, LossParts]:
        """The weighted sum of the terms for one micro-batch's student outputs (TrainOutputs);
        `koleo`: (the step's neighbours, this micro-batch's index) when found ahead."""
        s = self.settings
        dino = self.dino_loss.cross_entropy(out.head, targets.cls, n_crops)
        total, parts = dino, LossParts(dino=dino.detach())
        if s.koleo_weight > 0:
            koleo_value = self._koleo(out.global_cls, koleo)
            total = total + s.koleo_weight * koleo_value
            parts.koleo = koleo_value.detach()
        if s.ibot_weight > 0 and masks is not None:
            ibot = ibot_patch_loss(out.patch_head, targets.patch, masks.weights,
                                   masks.n_images, self.student_temp)
            total = total + s.ibot_weight * ibot
            parts.ibot = ibot.detach()
        return total, parts

    def _koleo(self, global_cls: torch.Tensor, koleo: tuple[KoLeoStep, int] | None) -> torch.Tensor:
        batch = global_cls.shape[0] // self.n_global_crops
        if self.settings.koleo_scope == "per_rank":
            return sum(koleo_loss(global_cls[c * batch:(c + 1) * batch].float())
                       for c in range(self.n_global_crops))
        if koleo is None:  # a step of one micro-batch: its own features are the whole step's
            koleo = (KoLeoStep([global_cls.detach().float()], self.n_global_crops), 0)
        step, micro_index = koleo
        return step.term(global_cls, micro_index)

    @torch.no_grad()
    def update_centers(self, cls_sum: torch.Tensor, cls_count, patch_sum: torch.Tensor | None,
                       patch_count, applied: torch.Tensor) -> None:
        self.dino_loss.update_center(cls_sum, cls_count, applied)
        if self.patch_center is not None and patch_sum is not None:
            # A step whose crops drew no masks has no patch mean: the center stays.
            self.patch_center.update(patch_sum, patch_count.clamp(min=1),
                                     applied & (patch_count > 0))
