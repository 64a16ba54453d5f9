"""One DINO optimizer step, split into micro-batches.

Order of operations inside a step, and why:
1. every micro-batch: teacher forward (global crops, no grad) → student forward (all crops)
   → loss against the *old* center → backward of loss/k (training.forward). Gradient sync
   (DDP all-reduce) runs only on the last micro-batch; the others sit in `no_sync`.
2. once per step: one all-reduce of [teacher-output sum | loss | non-finite flag | count |
   skipped images | stop flag] (training.step_sums). A non-finite loss or a stop request on
   any rank is therefore seen by every rank at the same step, so all skip, stop or save
   together instead of one rank leaving the others waiting in a collective.
3. gradients are unscaled and clipped, the last layer's gradient dropped while it is frozen;
   the verdict, a device bool, is a finite loss and gradient norm. The optimizer steps if
   the verdict lets it (training.update; fp16: the GradScaler must agree too), and what it
   returns, whether the step was applied, gates the center (moved only after every
   micro-batch used the old one) and the teacher's EMA (training.ema): a skipped step leaves
   weights, center and teacher untouched without the host waiting for the device.
4. the step's figures (loss, verdict, votes) are read on the host a step later, or at once on
   steps that log or save (training.counters): skipped steps are counted there, and more
   than `max_nonfinite_steps` in a row stop every rank.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from dino_dist.data import crops_on_device
from dino_dist.distributed.env import DistEnv
from dino_dist.training.clock import IdleClock
from dino_dist.training.counters import StepCounters
from dino_dist.training.ema import TeacherEMA
from dino_dist.training.forward import DinoForward
from dino_dist.training.loss import DINOLoss
from dino_dist.training.schedules import Schedules
from dino_dist.training.step_sums import StepSums
from dino_dist.training.update import OptimizerUpdate
from dino_dist.training.weights import TrainedWeights


@dataclass
class StepResult:
    """A step's outcome. `loss` and `skipped` are None unless the step was read at once
    (finish_step's `read_now`); `stop` holds the stop votes read in this call (this step's
    when read at once, else the previous step's): every rank reads the same."""
    loss: float | None
    grad_norm: torch.Tensor  # stays on device; read it only on logging steps
    skipped: bool | None  # not applied: non-finite loss or gradients, or the GradScaler's veto
    images: int  # images in this optimizer step, all ranks together
    stop: bool = False  # some rank asked to stop (see dino_dist.distributed.stop)


class DinoEngine:
    def __init__(self, student_wrapper: nn.Module, student: nn.Module, teacher: nn.Module,
                 loss_fn: DINOLoss, optimizer: torch.optim.Optimizer, schedules: Schedules,
                 env: DistEnv, precision: str = "fp32", clip_grad: float = 0.0,
                 clip_mode: str = "per_param", freeze_last_layer_epochs: int = 0,
                 last_layer_params: list[nn.Parameter] | None = None,
                 n_global_crops: int = 2, max_nonfinite_steps: int = 10, clock=None):
        """`student_wrapper` runs forward/backward (the DDP wrapper, or the model itself when
        unwrapped or FSDP-sharded); `student` is the model, whose weights are saved.
        `clock` (dino_dist.bench.phases.PhaseClock) times the phases under dino-bench."""
        self.student_wrapper, self.student, self.teacher = student_wrapper, student, teacher
        self.loss_fn, self.optimizer, self.schedules, self.env = loss_fn, optimizer, schedules, env
        self.n_global_crops = n_global_crops
        self.clock = clock or IdleClock()  # `mark(phase)` at each phase's end
        self.trainable = [p for p in student.parameters() if p.requires_grad]
        self.last_layer_params = last_layer_params or []
        self.forward = DinoForward(teacher, loss_fn, n_global_crops, precision, env.device,
                                   self.clock)
        self.update = OptimizerUpdate(optimizer, schedules, self.trainable, env.device,
                                      precision, clip_grad, clip_mode, freeze_last_layer_epochs,
                                      self.last_layer_params)
        self.ema = TeacherEMA(student, teacher)
        self.counters = StepCounters(env.device, env.world_size, max_nonfinite_steps)
        self.weights = TrainedWeights(student, teacher, optimizer)
        self.sums = StepSums(loss_fn.center.shape[-1], env.device)

    # What the loop, the step report and dino-bench read of the pieces.
    scaler = property(lambda self: self.update.scaler)
    autocast_dtype = property(lambda self: self.forward.autocast_dtype)
    skipped_steps = property(lambda self: self.counters.skipped_steps)
    skipped_images = property(lambda self: self.counters.skipped_images)

    def state_dict(self, weights: bool = True) -> dict:
        """Scaler, center and counters; with `weights`, the student, teacher and optimizer
        too (whole tensors, for single-file checkpoints; a sharded save writes them through
        `self.weights.sharded_state_dict()`)."""
        counters = self.counters.state_dict()  # first: it settles a step still in flight
        return {**(self.weights.state_dict() if weights else {}),
                "scaler": self.scaler.state_dict(), "loss": self.loss_fn.state_dict(),
                **counters}

    def load_state_dict(self, state: dict) -> None:
        """The inverse of state_dict; the weights only when the state holds them (sharded
        checkpoints load theirs through `self.weights.load_sharded_state_dict`)."""
        if "student" in state:
            self.weights.load_state_dict(state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.load_state_dict(state["loss"])
        self.counters.load_state_dict(state)

    def micro_step(self, crops: list[torch.Tensor], step: int, loss_weight: float,
                   sync_grads: bool, skipped_images: int = 0, stats=None) -> None:
        """Forward and backward of one micro-batch; `loss_weight` is 1/len(group).

        `stats` (an observe.diagnostics.StepStatistics) is given on logging steps only:
        ordinary steps compute no statistics and send nothing extra."""
        crops = crops_on_device(crops, self.env.device)  # augment_on=gpu: the crops are made here
        self.clock.mark("data")
        teacher_temp = self.schedules.teacher_temp_at(step)
        with gradient_sync(self.student_wrapper, sync_grads):
            out = self.forward(self.student_wrapper, crops, teacher_temp)
            self.scaler.scale(out.loss * loss_weight).backward()
            self.clock.mark("backward")
        self.sums.add(out.teacher, out.loss, loss_weight, skipped_images)
        self.clock.mark("loss")
        if stats is not None:  # the loss's own (old) center: finish_step moves it
            stats.add_teacher(out.teacher, self.loss_fn.center, teacher_temp)
            stats.add_pairs(out.student, out.teacher, self.loss_fn.center, teacher_temp,
                            self.loss_fn.student_temp, self.n_global_crops)

    def finish_step(self, step: int, epoch: int, stop_requested: bool = False,
                    stats=None, read_now: bool = True) -> StepResult:
        """Reduce the step's statistics across ranks, move the center, update student and teacher.

        `stop_requested` (this rank's flag) rides in the same reduction, so the answer in
        StepResult.stop is the same on every rank. Whether the step is applied (finite loss
        and gradients) is decided on the device. Without `read_now` the step's figures
        (loss, verdict, votes) reach the host at the next step: the host does not wait for
        the device, and this step's skip and stop show up one step later.
        """
        self.settle()  # the previous step's figures, copied long ago
        teacher_sum, figures = self.sums.reduce(stop_requested, stats)
        self.clock.mark("communication")
        # Every rank holds the same number of micro-batches of the same size (drop_last).
        images = self.sums.count * self.env.world_size // self.n_global_crops
        self.sums.reset()
        step = self.schedules.index(step)
        grad_norm, applied = self._apply(step, epoch, teacher_sum, figures, stats)
        self.update.zero_grad()
        self.clock.mark("optimizer")
        self.counters.post(figures, applied, step, epoch)
        read = self.counters.settle() if read_now else None
        loss, skipped = read if read is not None else (None, None)
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=skipped, images=images,
                          stop=self.counters.take_stop())

    def settle(self) -> None:
        """Read a step's figures still in flight (before saving, and when training ends);
        a stop vote found here is returned by the next finish_step."""
        self.counters.settle()

    def _apply(self, step: int, epoch: int, teacher_sum: torch.Tensor, figures: torch.Tensor,
               stats) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimizer, center and teacher updates, each gated by whether the step is applied."""
        grad_norm = self.update.unscale_and_clip(epoch, stats)
        # Gradients are identical on all ranks after DDP's all-reduce (a sharded norm is
        # all-reduced), so every rank reaches the same verdict without another collective.
        non_finite_loss, count = figures[1], figures[2]  # in step_sums.FIGURES' order
        verdict = (non_finite_loss == 0) & torch.isfinite(grad_norm)
        self.clock.mark("clip")
        applied = self.update.step(step, verdict)
        self.clock.mark("optimizer")
        self.loss_fn.update_center(teacher_sum, count, applied)
        self.clock.mark("loss")
        self.ema.update(float(self.schedules.momentum[step]), applied)
        self.clock.mark("ema")
        return grad_norm, applied


def gradient_sync(student_wrapper: nn.Module, sync_grads: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) on all but the last
    micro-batch; FSDP then holds unsharded gradients until the step (the memory price)."""
    if hasattr(student_wrapper, "set_requires_gradient_sync"):
        student_wrapper.set_requires_gradient_sync(sync_grads)
        return contextlib.nullcontext()
    no_sync = getattr(student_wrapper, "no_sync", None)
    return contextlib.nullcontext() if sync_grads or no_sync is None else no_sync()
