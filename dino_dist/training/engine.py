"""One DINO optimizer step, split into micro-batches.

Order of operations inside a step, and why:
1. every micro-batch: teacher forward (global crops, no grad) → student forward (all crops)
   → loss against the *old* center → backward of loss/k. Gradient sync (DDP all-reduce) runs
   only on the last micro-batch; the others sit in `no_sync`.
2. once per step: one all-reduce of [teacher-output sum | loss | non-finite flag | count |
   skipped images | stop flag]. A non-finite loss or a stop request on any rank is therefore
   seen by every rank at the same step, so all skip, stop or save together instead of one
   rank leaving the others waiting in a collective.
3. gradients are unscaled and clipped, the last layer's gradient dropped while it is frozen;
   then the center moves (after every micro-batch used the old one), the optimizer steps and
   the teacher follows by EMA with fused foreach ops — each gated by one device bool, the
   verdict: a step with a non-finite loss or gradient norm leaves weights, center and teacher
   untouched without the host waiting for the device.
4. the step's figures (loss, verdict, votes) are read on the host a step later, or at once on
   steps that log or save (HostReadback): skipped steps are counted there, and more than
   `max_nonfinite_steps` in a row stop every rank.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dino_dist.data import crops_on_device
from dino_dist.distributed.collectives import all_reduce_sum_
from dino_dist.distributed.env import DistEnv
from dino_dist.distributed.parallel import release_gathered_parameters
from dino_dist.errors import NonFiniteLossError
from dino_dist.training.loss import DINOLoss
from dino_dist.training.readback import HostReadback
from dino_dist.training.schedules import Schedules


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's shards of DTensors (FSDP), plain tensors as they are."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


class _IdleClock:
    """Phase marks cost one no-op call unless a benchmark installs a clock
    (dino_dist.bench.phases.PhaseClock): training pays nothing for them."""

    def mark(self, phase: str) -> None:
        return None  # deliberately nothing: phases are only timed under dino-bench


@dataclass
class StepResult:
    """A step's outcome. `loss` and `skipped` are None unless the step was read at once
    (finish_step's `read_now`); `stop` holds the stop votes read in this call (this step's
    when read at once, else the previous step's): every rank reads the same."""
    loss: float | None
    grad_norm: torch.Tensor  # stays on device; read it only on logging steps
    skipped: bool | None  # not applied: non-finite loss or gradients (fp16: the GradScaler's verdict)
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
        self.precision = precision
        self.clip_grad, self.clip_mode = clip_grad, clip_mode
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.last_layer_params = last_layer_params or []
        self.n_global_crops = n_global_crops
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # EMA pairs: every student tensor (trainable or frozen) mirrors a teacher tensor.
        self.ema_student = list(student.parameters())  # updated under no_grad only
        self.ema_teacher = list(teacher.parameters())
        self.trainable = [p for p in student.parameters() if p.requires_grad]
        self.skipped_steps = 0  # steps not applied (non-finite loss or gradients), whole run
        self.bad_streak = 0  # consecutive skipped steps, checked against max_nonfinite_steps
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skipped_images = 0  # unreadable images replaced by the data pipeline, all ranks
        self.clock = clock or _IdleClock()  # `mark(phase)` at each phase's end
        self.readback = HostReadback(env.device)  # a step's figures, read a step later
        self._posted_at = (0, 0)  # (schedule step, epoch) of the figures in `readback`
        self._stop_seen = False  # a stop vote read but not yet returned by finish_step
        self._reset_pending()

    WEIGHT_KEYS = ("student", "teacher", "optimizer")

    def state_dict(self, weights: bool = True) -> dict:
        """Scaler, center and counters; with `weights`, the student, teacher and optimizer
        too (whole tensors, for single-file checkpoints)."""
        self.settle()  # the counters of a step still in flight belong in the checkpoint
        state = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                 "optimizer": self.optimizer.state_dict()} if weights else {}
        return {**state, "scaler": self.scaler.state_dict(), "loss": self.loss_fn.state_dict(),
                "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images}

    def load_state_dict(self, state: dict) -> None:
        """The inverse of state_dict; the weights only when the state holds them (sharded
        checkpoints load theirs through load_sharded_weights)."""
        if "student" in state:
            self.student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.load_state_dict(state["loss"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skipped_images = int(state.get("skipped_images", 0))

    def sharded_weights(self) -> dict:
        """Student, teacher and optimizer in DCP's layout (parameter-name keys; a sharded
        model's tensors stay shards), for sharded checkpoints at any world size."""
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             get_optimizer_state_dict)
        return {"student": get_model_state_dict(self.student),
                "teacher": get_model_state_dict(self.teacher),
                "optimizer": get_optimizer_state_dict(self.student, self.optimizer)}

    def load_sharded_weights(self, weights: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)
        set_model_state_dict(self.student, weights["student"])
        set_model_state_dict(self.teacher, weights["teacher"])
        # Not strict: a parameter the checkpoint holds no state for (the last layer while
        # it was frozen) stays without one, as in the run that was never stopped.
        set_optimizer_state_dict(self.student, self.optimizer, weights["optimizer"],
                                 options=StateDictOptions(strict=False))

    def _reset_pending(self) -> None:
        out_dim = self.loss_fn.center.shape[-1]
        self.pending_teacher_sum = torch.zeros(out_dim, device=self.env.device)
        self.pending_loss = torch.zeros(2, device=self.env.device)  # weighted loss, non-finite
        # Known on the host already: they join the reduction buffer only in finish_step.
        self.pending_count = 0
        self.pending_skipped_images = 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def micro_step(self, crops: list[torch.Tensor], step: int, loss_weight: float,
                   sync_grads: bool, skipped_images: int = 0, stats=None) -> None:
        """Forward and backward of one micro-batch; `loss_weight` is 1/len(group).

        `stats` (an observe.diagnostics.StepStatistics) is given on logging steps only:
        ordinary steps compute no statistics and send nothing extra."""
        device = self.env.device
        crops = crops_on_device(crops, device)  # data.augment_on=gpu: the crops are made here
        self.clock.mark("data")
        teacher_temp = self.schedules.teacher_temp_at(step)
        with self._gradient_sync(sync_grads):
            with self.autocast():
                with torch.no_grad():
                    teacher_out = self.teacher(crops[: self.n_global_crops])
                release_gathered_parameters(self.teacher)  # else the next step uses pre-EMA
                self.clock.mark("teacher_forward")
                student_out = self.student_wrapper(crops)
                self.clock.mark("student_forward")
                loss = self.loss_fn(student_out, teacher_out, teacher_temp, len(crops))
                self.clock.mark("loss")
            self.scaler.scale(loss * loss_weight).backward()
            self.clock.mark("backward")
        with torch.no_grad():
            self.pending_teacher_sum += teacher_out.float().sum(dim=0)
            self.pending_loss += torch.stack((loss.detach() * loss_weight,
                                              (~torch.isfinite(loss.detach())).float()))
        self.clock.mark("loss")
        self.pending_count += teacher_out.shape[0]
        self.pending_skipped_images += skipped_images
        if stats is not None:  # the loss's own (old) center: finish_step moves it
            stats.add_teacher(teacher_out, self.loss_fn.center, teacher_temp)
            stats.add_pairs(student_out, teacher_out, self.loss_fn.center, teacher_temp,
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
        reduced = self._reduce(stop_requested, stats)
        teacher_sum, figures = reduced[:-5], reduced[-5:]
        self.clock.mark("communication")
        # Every rank holds the same number of micro-batches of the same size (drop_last).
        images = self.pending_count * self.env.world_size // self.n_global_crops
        self._reset_pending()
        step = self.schedules.index(step)
        grad_norm, applied = self._apply(step, epoch, teacher_sum, figures, stats)
        self.optimizer.zero_grad(set_to_none=True)
        self.clock.mark("optimizer")
        self.readback.post(torch.cat((figures, applied.float().view(1))))
        self._posted_at = (step, epoch)
        loss, skipped = (self._settle(self.readback.take()) if read_now else (None, None))
        stop, self._stop_seen = self._stop_seen, False
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=skipped, images=images,
                          stop=stop)

    def settle(self) -> None:
        """Read a step's figures still in flight (before saving, and when training ends);
        a stop vote found here is returned by the next finish_step."""
        figures = self.readback.take()
        if figures is not None:
            self._settle(figures)

    def _settle(self, figures: list[float]) -> tuple[float, bool]:
        """Count a step's skip and unreadable images, note its stop votes, check the streak."""
        loss_sum, non_finite, _count, skipped_images, stop_votes, applied = figures
        self.skipped_images += int(skipped_images)
        self._stop_seen = self._stop_seen or stop_votes > 0
        step, epoch = self._posted_at
        self._count_bad_step(applied == 0, step, epoch, non_finite > 0)
        return loss_sum / self.env.world_size, applied == 0

    def _reduce(self, stop_requested: bool, stats) -> torch.Tensor:
        """The step's one all-reduce: [statistics |] teacher sum | loss, non-finite flag |
        count, unreadable images, stop votes. Host numbers travel through pinned memory
        without blocking (a plain host-to-device copy waits for the device)."""
        host = torch.tensor([self.pending_count, self.pending_skipped_images,
                             float(stop_requested)], dtype=torch.float32)
        if self.env.device.type == "cuda":
            host = host.pin_memory()
        parts = (self.pending_teacher_sum, self.pending_loss,
                 host.to(self.env.device, non_blocking=True))
        if stats is not None:  # the statistics join the step's one reduction
            parts = (stats.reduction_part(), *parts)
        reduced = all_reduce_sum_(torch.cat(parts))
        return stats.take_reduced(reduced) if stats is not None else reduced

    def _apply(self, step: int, epoch: int, teacher_sum: torch.Tensor, figures: torch.Tensor,
               stats) -> tuple[torch.Tensor, torch.Tensor]:
        """Center, optimizer and teacher updates, each gated by the step's verdict, a device
        bool: a finite loss and gradient norm (fp16: and the GradScaler's own verdict)."""
        grad_norm = self._unscale_and_clip(epoch, stats)
        # Gradients are identical on all ranks after DDP's all-reduce (a sharded norm is
        # all-reduced), so every rank reaches the same verdict without another collective.
        applied = (figures[1] == 0) & torch.isfinite(grad_norm)
        self.clock.mark("clip")
        self.loss_fn.update_center(teacher_sum, figures[2], applied)
        self.clock.mark("loss")
        self._apply_schedule(step)
        if self.scaler.is_enabled():
            applied = self._scaled_optimizer_step()
        else:
            self._optimizer_step_if(applied)
        self.clock.mark("optimizer")
        self._update_teacher(float(self.schedules.momentum[step]), applied)
        self.clock.mark("ema")
        return grad_norm, applied

    def _scaled_optimizer_step(self) -> torch.Tensor:
        """fp16: the GradScaler skips a step with inf/NaN gradients and says so only by
        lowering its scale, a host read: this path waits for the device every step."""
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return torch.tensor(self.scaler.get_scale() >= scale_before, device=self.env.device)

    def _optimizer_step_if(self, applied: torch.Tensor) -> None:
        """A fused optimizer skips on the device when handed `found_inf`, as under a
        GradScaler (parameters, moments and step counts untouched); others need the host."""
        if not self.optimizer.defaults.get("fused"):
            if bool(applied):
                self.optimizer.step()
            return
        self.optimizer.found_inf = (~applied).float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf

    def _unscale_and_clip(self, epoch: int, stats) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients(stats)
        if epoch < self.freeze_last_layer_epochs:
            for p in self.last_layer_params:
                p.grad = None
        return grad_norm

    def _count_bad_step(self, bad: bool, step: int, epoch: int, loss_non_finite: bool) -> None:
        """Skipped steps are counted; too many in a row stop every rank (they all count alike)."""
        self.skipped_steps += int(bad)
        self.bad_streak = self.bad_streak + 1 if bad else 0
        if self.bad_streak > self.max_nonfinite_steps:
            what = "a non-finite loss" if loss_non_finite else "non-finite gradients"
            raise NonFiniteLossError(
                f"{self.bad_streak} optimizer steps in a row had {what} (the last at "
                f"step {step}, epoch {epoch}; limit train.max_nonfinite_steps="
                f"{self.max_nonfinite_steps}); all ranks stopped and the last checkpoint is kept. "
                f"Lower optim.lr, use train.precision=bf16 or fp32, or check the data")

    def _apply_schedule(self, step: int) -> None:
        lr, wd = float(self.schedules.lr[step]), float(self.schedules.wd[step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group.get("weight_decay_applies", True):
                group["weight_decay"] = wd

    def _gradient_sync(self, sync_grads: bool):
        """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) on all but the last
        micro-batch; FSDP then holds unsharded gradients until the step (the memory price)."""
        if hasattr(self.student_wrapper, "set_requires_gradient_sync"):
            self.student_wrapper.set_requires_gradient_sync(sync_grads)
            return contextlib.nullcontext()
        no_sync = getattr(self.student_wrapper, "no_sync", None)
        return contextlib.nullcontext() if sync_grads or no_sync is None else no_sync()

    def _grad_norms(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each parameter's gradient norm; for sharded gradients, over the whole parameter
        (local squared norms summed across ranks in one all-reduce)."""
        if not isinstance(grads[0], DTensor):
            return torch._foreach_norm(grads)
        squares = torch.stack(torch._foreach_norm(local_tensors(grads))) ** 2
        return list(all_reduce_sum_(squares).sqrt().unbind())

    def _clip_gradients(self, stats=None) -> torch.Tensor:
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.env.device)
        norms = self._grad_norms(grads)
        grads = local_tensors(grads)  # scaling a shard in place scales that part of the parameter
        if stats is not None:
            stats.add_grad_norms(self.trainable, norms)
        total_norm = torch.linalg.vector_norm(torch.stack(norms))
        if self.clip_grad <= 0:
            return total_norm
        if self.clip_mode == "global":
            coef = torch.clamp(self.clip_grad / (total_norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef)
        else:
            # DINO's rule: each parameter's gradient is capped at norm clip_grad on its own.
            coefs = torch.clamp(self.clip_grad / (torch.stack(norms) + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coefs.unbind())
        return total_norm

    @torch.no_grad()
    def _update_teacher(self, momentum: float, applied: torch.Tensor) -> None:
        # Sharded models are sharded alike, so the EMA runs shard by shard with no gather.
        # The shards are looked up each time: FSDP may re-point them (e.g. at its lazy init).
        teacher, student = local_tensors(self.ema_teacher), local_tensors(self.ema_student)
        # A skipped step keeps the teacher: momentum 1, decided on the device.
        kept = torch.where(applied, momentum, 1.0)
        torch._foreach_mul_(teacher, kept)
        torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - kept))
