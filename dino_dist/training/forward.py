"""The forward passes of a step: the teacher on the global crops, the student on every crop,
and the losses between them (training.objective).

A step's teacher passes may all run before its student passes (the engine decides): the
Sinkhorn-Knopp targets and the exact KoLeo term need the whole step's teacher outputs or
student features first. Evaluation's validation loss runs `__call__`, the DINO term of
training against the current center, so it is the training loss on other images.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from dino_dist.distributed.parallel import release_gathered_parameters
from dino_dist.models.patch_masks import PatchMasks
from dino_dist.training.clock import IdleClock
from dino_dist.training.objective import LossParts, Objective, Targets
from dino_dist.training.teacher_copy import LowPrecisionTeacher

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TeacherOutputs:
    """One micro-batch's teacher pass (no gradient)."""
    cls: torch.Tensor  # [global crops x B, out_dim] head outputs
    patches: torch.Tensor | None  # [masked tokens, patch out_dim] at the student's masks (iBOT)


@dataclass
class ForwardOutputs:
    targets: Targets  # what the student was trained towards
    student: torch.Tensor  # [crops x B, out_dim] head outputs, for the step's statistics
    loss: torch.Tensor  # the weighted sum of the parts: what backward runs on
    parts: LossParts  # each term's value (detached)


class DinoForward:
    def __init__(self, teacher: nn.Module, objective: Objective, precision: str,
                 device: torch.device, clock=None):
        self.teacher, self.objective = teacher, objective
        self.n_global_crops = objective.n_global_crops
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        # The teacher's matmul weights cast once per pass, not at each use (teacher_copy.py).
        self.low_precision_teacher = LowPrecisionTeacher(teacher, self.autocast_dtype) \
            if LowPrecisionTeacher.applies(teacher, self.autocast_dtype) else None
        self.device = device
        self.clock = clock or IdleClock()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def teacher_pass(self, crops: list[torch.Tensor], masks: PatchMasks | None) -> TeacherOutputs:
        teacher = self.teacher if self.low_precision_teacher is None \
            else self.low_precision_teacher.module()
        with self.autocast():
            out = teacher(crops[: self.n_global_crops], output="train", masks=masks,
                          mask_inputs=False)
        # A sharded teacher keeps what it gathered until a backward that never comes:
        # the next forward would then use the weights from before the EMA.
        release_gathered_parameters(self.teacher)
        self.clock.mark("teacher_forward")
        return TeacherOutputs(out.head.float(), None if out.patch_head is None
                              else out.patch_head.float())

    def student_features(self, student: nn.Module, crops: list[torch.Tensor],
                         masks: PatchMasks | None) -> torch.Tensor:
        """The global crops' CLS features of a student forward without gradients (the exact
        KoLeo term's look-ahead over the step; the caller replays the same random draws)."""
        with torch.no_grad(), self.autocast():
            out = student(crops, output="train", masks=masks, n_global=self.n_global_crops)
        release_gathered_parameters(student)
        return out.global_cls.float()

    def student_pass(self, student: nn.Module, crops: list[torch.Tensor],
                     masks: PatchMasks | None, targets: Targets, koleo=None) -> ForwardOutputs:
        """`student`: the module to run (training passes its DDP wrapper, evaluation the model
        itself); `koleo`: the step's KoLeo neighbours when the engine found them ahead."""
        with self.autocast():
            out = student(crops, output="train", masks=masks, n_global=self.n_global_crops)
            self.clock.mark("student_forward")
            loss, parts = self.objective.loss(out, targets, masks, len(crops), koleo)
            self.clock.mark("loss")
        return ForwardOutputs(targets, out.head, loss, parts)

    def __call__(self, student: nn.Module, crops: list[torch.Tensor],
                 teacher_temp: float) -> ForwardOutputs:
        """The DINO term alone against the current center (the validation loss)."""
        teacher = self.teacher_pass(crops, None)
        targets = Targets(self.objective.centered(teacher.cls, teacher_temp), None)
        with self.autocast():
            out = student(crops, output="train", n_global=self.n_global_crops)
            loss = self.objective.dino_loss.cross_entropy(out.head, targets.cls, len(crops))
        return ForwardOutputs(targets, out.head, loss, LossParts(dino=loss.detach()))
