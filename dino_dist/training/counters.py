"""What the host learns from a step: its loss, whether it was skipped, unreadable images, stop
votes; the run's counts of skipped steps and images, and the stop after too many bad steps.

A step's figures are posted on the device and read back a step later (HostReadback), or at
once on steps that log or save. Every rank reads the same all-reduced figures, so every rank
counts alike and raises NonFiniteLossError at the same step: none is left in a collective.
"""
from __future__ import annotations

import torch

from dino_dist.errors import NonFiniteLossError
from dino_dist.training.readback import HostReadback
from dino_dist.training.step_sums import FIGURES


class StepCounters:
    def __init__(self, device: torch.device, world_size: int, max_nonfinite_steps: int = 10):
        self.readback = HostReadback(device)
        self.world_size, self.max_nonfinite_steps = world_size, max_nonfinite_steps
        self.skipped_steps = 0  # steps not applied (non-finite loss or gradients), whole run
        self.bad_streak = 0  # consecutive skipped steps, checked against max_nonfinite_steps
        self.skipped_images = 0  # unreadable images replaced by the data pipeline, all ranks
        self._posted_at = (0, 0)  # (schedule step, epoch) of the figures in `readback`
        self._stop_seen = False  # a stop vote read but not yet taken

    def post(self, figures: torch.Tensor, applied: torch.Tensor, step: int, epoch: int) -> None:
        """`figures`: the step's reduced FIGURES (training.step_sums); `applied`: whether the
        step was applied (a device bool)."""
        self.readback.post(torch.cat((figures, applied.float().view(1))))
        self._posted_at = (step, epoch)

    def settle(self) -> tuple[float, bool] | None:
        """Read the figures in flight, if any: (mean loss over ranks, skipped)."""
        figures = self.readback.take()
        if figures is None:
            return None
        f = dict(zip((*FIGURES, "applied"), figures))
        self.skipped_images += int(f["skipped_images"])
        self._stop_seen = self._stop_seen or f["stop_votes"] > 0
        step, epoch = self._posted_at
        self._count_bad_step(f["applied"] == 0, step, epoch, f["non_finite"] > 0)
        return f["loss_sum"] / self.world_size, f["applied"] == 0

    def take_stop(self) -> bool:
        """Whether a stop vote was read since the last call."""
        stop, self._stop_seen = self._stop_seen, False
        return stop

    def state_dict(self) -> dict[str, int]:
        self.settle()  # the counts of a step still in flight belong in the checkpoint
        return {"skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skipped_images = int(state.get("skipped_images", 0))

    def _count_bad_step(self, bad: bool, step: int, epoch: int, loss_non_finite: bool) -> None:
        self.skipped_steps += int(bad)
        self.bad_streak = self.bad_streak + 1 if bad else 0
        if self.bad_streak > self.max_nonfinite_steps:
            what = "a non-finite loss" if loss_non_finite else "non-finite gradients"
            raise NonFiniteLossError(
                f"{self.bad_streak} optimizer step{'s' if self.bad_streak > 1 else ''} in a "
                f"row had {what} (the last at "
                f"step {step}, epoch {epoch}; limit train.max_nonfinite_steps="
                f"{self.max_nonfinite_steps}); all ranks stopped and the last checkpoint is kept. "
                f"Lower optim.lr, use train.precision=bf16 or fp32, or check the data")
