"""One DINO optimizer step, split into micro-batches.

Order of operations inside a step, and why:
1. every micro-batch: teacher forward (global crops, no grad) → the teacher's targets →
   student forward (all crops) → loss → backward of loss/k (training.forward,
   training.objective). The targets use the *old* center. Gradient sync (DDP all-reduce)
   runs only on the last micro-batch; the others sit in `no_sync`. When the targets or the
   KoLeo term need the whole step (Sinkhorn-Knopp over the step's batch; exact global KoLeo
   with several micro-batches), every teacher pass of the step runs first (and the student
   features are looked ahead without gradients, the random draws replayed), then the
   student passes: k micro-batches of B/k then train exactly as one batch of B.
2. once per step: one all-reduce of [teacher-output sum | patch sum | loss | non-finite flag
   | count | skipped images | stop flag] (training.step_sums). A non-finite loss or a stop
   request on any rank is therefore seen by every rank at the same step, so all skip, stop or
   save together instead of one rank leaving the others waiting in a collective.
3. gradients are unscaled and clipped, the last layer's gradient dropped while it is frozen;
   the verdict, a device bool, is a finite loss and gradient norm. The optimizer steps if
   the verdict lets it (training.update; fp16: the GradScaler must agree too), and what it
   returns, whether the step was applied, gates the centers (moved only after every
   micro-batch used the old ones) and the teacher's EMA (training.ema): a skipped step leaves
   weights, centers and teacher untouched without the host waiting for the device.
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
from dino_dist.models.patch_masks import PatchMasks
from dino_dist.training.clock import IdleClock
from dino_dist.training.counters import StepCounters
from dino_dist.training.ema import TeacherEMA
from dino_dist.training.forward import DinoForward, TeacherOutputs
from dino_dist.training.objective import KoLeoStep, Objective
from dino_dist.training.schedules import Schedules
from dino_dist.training.step_sums import StepSums
from dino_dist.training.update import OptimizerUpdate
from dino_dist.training.weights import TrainedWeights


@dataclass
class MicroBatch:
    """A micro-batch waiting for its student pass."""
    crops: list[torch.Tensor]
    masks: PatchMasks | None
    teacher: TeacherOutputs
    loss_weight: float
    skipped_images: int


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
                 objective: Objective, optimizer: torch.optim.Optimizer, schedules: Schedules,
                 env: DistEnv, precision: str = "fp32", clip_grad: float = 0.0,
                 clip_mode: str = "per_param", freeze_last_layer_epochs: int = 0,
                 last_layer_params: list[nn.Parameter] | None = None,
                 max_nonfinite_steps: int = 10, clock=None):
        """`student_wrapper` runs forward/backward (the DDP wrapper, or the model itself when
        unwrapped or FSDP-sharded); `student` is the model, whose weights are saved.
        `clock` (dino_dist.bench.phases.PhaseClock) times the phases under dino-bench."""
        self.student_wrapper, self.student, self.teacher = student_wrapper, student, teacher
        self.objective, self.optimizer, self.schedules, self.env = objective, optimizer, schedules, env
        self.loss_fn = objective.dino_loss  # the center: saved, reported
        self.n_global_crops = objective.n_global_crops
        self.clock = clock or IdleClock()  # `mark(phase)` at each phase's end
        self.trainable = [p for p in student.parameters() if p.requires_grad]
        self.last_layer_params = last_layer_params or []
        self.forward = DinoForward(teacher, objective, precision, env.device, self.clock)
        self.update = OptimizerUpdate(optimizer, schedules, self.trainable, env.device,
                                      precision, clip_grad, clip_mode, freeze_last_layer_epochs,
                                      self.last_layer_params)
        self.ema = TeacherEMA(student, teacher)
        self.counters = StepCounters(env.device, env.world_size, max_nonfinite_steps)
        self.weights = TrainedWeights(student, teacher, optimizer)
        patch_center = objective.patch_center
        self.sums = StepSums(self.loss_fn.center.shape[-1], env.device,
                             0 if patch_center is None else patch_center.center.shape[-1])
        self.pending: list[MicroBatch] = []
        settings = objective.settings
        # The student passes wait for the step's last micro-batch when its targets or its
        # KoLeo neighbours come from the whole step.
        self.look_ahead_koleo = settings.global_koleo
        self.defer_students = settings.whole_step_targets or self.look_ahead_koleo

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
        patch_center = self.objective.patch_center
        return {**(self.weights.state_dict() if weights else {}),
                "scaler": self.scaler.state_dict(), "loss": self.loss_fn.state_dict(),
                **({} if patch_center is None else {"patch_center": patch_center.state_dict()}),
                **counters}

    def load_state_dict(self, state: dict) -> None:
        """The inverse of state_dict; the weights only when the state holds them (sharded
        checkpoints load theirs through `self.weights.load_sharded_state_dict`)."""
        if "student" in state:
            self.weights.load_state_dict(state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.load_state_dict(state["loss"])
        # A run that turns iBOT on from a checkpoint without it starts its patch center at 0.
        if self.objective.patch_center is not None and "patch_center" in state:
            self.objective.patch_center.load_state_dict(state["patch_center"])
        self.counters.load_state_dict(state)

    def micro_step(self, crops: list[torch.Tensor], step: int, loss_weight: float,
                   sync_grads: bool, skipped_images: int = 0, stats=None,
                   masks: torch.Tensor | None = None) -> None:
        """One micro-batch: its teacher pass, and its student pass (forward and backward) now,
        or with the step's last micro-batch (`sync_grads`) when the step's targets need all
        of them. `loss_weight` is 1/len(group); `masks`: its iBOT masks.

        `stats` (an observe.diagnostics.StepStatistics) is given on logging steps only:
        ordinary steps compute no statistics and send nothing extra."""
        crops = crops_on_device(crops, self.env.device)  # augment_on=gpu: the crops are made here
        if masks is not None:
            masks = PatchMasks.from_host(masks, self.env.device)
        self.clock.mark("data")
        teacher = self.forward.teacher_pass(crops, masks)
        self.pending.append(MicroBatch(crops, masks, teacher, loss_weight, skipped_images))
        if sync_grads or not self.defer_students:
            self._student_passes(step, stats, last_of_step=sync_grads)

    def _student_passes(self, step: int, stats, last_of_step: bool) -> None:
        """The student passes of the waiting micro-batches; only the step's last syncs."""
        pending, self.pending = self.pending, []
        teacher_temp = self.schedules.teacher_temp_at(step)
        targets = self.objective.targets([m.teacher for m in pending], teacher_temp)
        koleo = self._koleo_step(pending) if self.look_ahead_koleo and len(pending) > 1 else None
        for index, (micro, target) in enumerate(zip(pending, targets)):
            sync = last_of_step and index == len(pending) - 1
            with gradient_sync(self.student_wrapper, sync):
                out = self.forward.student_pass(self.student_wrapper, micro.crops, micro.masks,
                                                target, None if koleo is None else (koleo, index))
                self.scaler.scale(out.loss * micro.loss_weight).backward()
                self.clock.mark("backward")
            self.sums.add(micro.teacher.cls, out.loss, micro.loss_weight, micro.skipped_images,
                          micro.teacher.patches)
            self.clock.mark("loss")
            if stats is not None:
                stats.add_step_outputs(out, self.objective.student_temp, self.n_global_crops,
                                       micro.loss_weight)

    def _koleo_step(self, pending: list[MicroBatch]) -> KoLeoStep:
        """The KoLeo neighbours of the whole step, from the student's features of every
        micro-batch computed ahead without gradients. The random draws (stochastic depth) are
        replayed: the passes with gradients then draw the same and see the same features."""
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            features = [self.forward.student_features(self.student_wrapper, m.crops, m.masks)
                        for m in pending]
        return KoLeoStep(features, self.n_global_crops)

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
        teacher_sum, patch_sums, figures = self.sums.reduce(stop_requested, stats)
        self.clock.mark("communication")
        # Every rank holds the same number of micro-batches of the same size (drop_last).
        images = self.sums.count * self.env.world_size // self.n_global_crops
        self.sums.reset()
        step = self.schedules.index(step)
        grad_norm, applied = self._apply(step, epoch, teacher_sum, patch_sums, figures, stats)
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

    def _apply(self, step: int, epoch: int, teacher_sum: torch.Tensor,
               patch_sums: torch.Tensor | None, figures: torch.Tensor,
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
        self.objective.update_centers(
            teacher_sum, count, None if patch_sums is None else patch_sums[:-1],
            None if patch_sums is None else patch_sums[-1], applied)
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
