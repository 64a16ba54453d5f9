"""Warnings that name what is going wrong in a run, its likely cause and the usual fix.

DINO's common failures are silent: the loss sits at ln(out_dim) (uniform collapse), the
teacher turns one-hot on a handful of prototypes (dimensional collapse), fp16 overflows
until every step is skipped, a small batch with the default teacher momentum never learns.
Each rule here looks at the figures of the logging steps (diagnostics.StepStatistics plus the
usual metrics) and speaks once a condition has held for `window` logging steps in a row.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

UNIFORM_ENTROPY_RATIO = 0.95  # teacher entropy / ln(out_dim) at or above: near-uniform outputs
UNIFORM_LOSS_RATIO = 0.95  # loss / ln(out_dim) at or above: the loss sits at ln(out_dim)
ONE_HOT_ENTROPY_RATIO = 0.1  # teacher entropy / ln(out_dim) below: near one-hot outputs
FEW_PROTOTYPES_SHARE = 0.05  # prototypes used / min(teacher rows, out_dim) below: few in use
FEW_PROTOTYPES = 2  # this many or fewer in use is few at any batch size
# Near collapse: after the first epoch, fewer than this share of min(teacher rows, out_dim)
# take the teacher's argmax while the student picks the teacher's prototype on at least this
# share of the crop pairs. The demo's recipe before its study (k-NN 56 %) held both from its
# sixth epoch on (1.6-5.5 % of 128 rows; agreement 0.75-0.91); the runs that learned shape
# used 7-16 % of the rows once their agreement rose above 0.6 (benchmarks/demo_sweep.py).
NEAR_COLLAPSE_PROTOTYPE_SHARE = 0.06
NEAR_COLLAPSE_AGREEMENT = 0.7
GRAD_EXPLOSION_FACTOR = 10.0  # gradient norm above this many times its recent median
GRAD_HISTORY = 20  # logging steps in that median
FP16_SKIP_SHARE = 0.1  # skipped share of the steps since the last logging step
FP16_CALIBRATION_STEPS = 100  # the GradScaler's first skips find its scale: not a problem
REPEAT_EVERY = 10  # a warning that keeps holding is repeated every this many logging steps
# The reference recipe's teacher (momentum 0.996 at total batch 1024) averages the student over
# 1024 / 0.004 = 256k images; DINO advises a higher momentum for smaller batches (0.9995 at
# 256). Small data sets get a fifth of the data set instead.
REFERENCE_TEACHER_IMAGES = 1024 / (1 - 0.996)
MIN_TEACHER_DATASET_SHARE = 0.2


@dataclass(frozen=True)
class HealthWarning:
    code: str  # short name, written to metrics.jsonl
    message: str  # one line: what, the likely cause, the usual fix


def small_batch_warning(total_batch: int, momentum: float, dataset_size: int) -> HealthWarning | None:
    """The teacher averages about total_batch / (1 - momentum) images; too few make it follow
    the noisy small-batch student and the run does not learn."""
    wanted = min(REFERENCE_TEACHER_IMAGES, MIN_TEACHER_DATASET_SHARE * dataset_size)
    averaged = total_batch / max(1 - momentum, 1e-12)
    if averaged >= wanted:
        return None
    suggested = 1 - total_batch / wanted
    return HealthWarning(
        "small_batch",
        f"total batch {total_batch} is too small for teacher momentum {momentum:g}: the teacher "
        f"averages only ~{averaged:.0f} images (the reference recipe ~{wanted:.0f}). Raise "
        f"optim.teacher_momentum to >= {suggested:.5f}, or grow the batch (more GPUs or "
        f"optim.accum_steps)")


class HealthMonitor:
    """Rules over consecutive logging steps; `check` returns the warnings due at this step."""

    def __init__(self, out_dim: int, window: int, precision: str, settle_steps: int = 0):
        self.log_k = math.log(out_dim)
        self.window, self.precision = window, precision
        # The first epoch (random prototypes, the last layer frozen) is not judged for near
        # collapse: a healthy run also starts with few prototypes in use.
        self.settle_steps = settle_steps
        self.streaks = {"uniform_collapse": 0, "dimensional_collapse": 0, "near_collapse": 0,
                        "patch_uniform_collapse": 0, "patch_dimensional_collapse": 0}
        self.grad_norms: deque[float] = deque(maxlen=GRAD_HISTORY)
        self.last_step, self.last_skipped = 0, None

    def check(self, step: int, values: dict) -> list[HealthWarning]:
        found = [w for w in (self._collapse(step, values), self._patch_collapse(values),
                             self._gradients(values), self._fp16_skips(step, values))
                 if w is not None]
        self.last_step, self.last_skipped = step, values.get("skipped_steps")
        return found

    def _due(self, code: str, holds: bool) -> bool:
        self.streaks[code] = self.streaks[code] + 1 if holds else 0
        streak = self.streaks[code]
        return streak >= self.window and (streak - self.window) % REPEAT_EVERY == 0

    def _collapse(self, step: int, values: dict) -> HealthWarning | None:
        if "entropy_ratio" not in values:
            return None
        entropy, loss = values["entropy_ratio"], values["loss_ratio"]
        uniform = entropy >= UNIFORM_ENTROPY_RATIO and loss >= UNIFORM_LOSS_RATIO
        few = values["prototypes_used"] <= FEW_PROTOTYPES or \
            values["prototype_share"] < FEW_PROTOTYPES_SHARE
        one_hot = entropy < ONE_HOT_ENTROPY_RATIO and few
        if self._due("uniform_collapse", uniform):
            return HealthWarning(
                "uniform_collapse",
                f"uniform collapse: for {self.streaks['uniform_collapse']} logging steps the "
                f"{'DINO term of the ' if 'loss_dino' in values else ''}loss "
                f"({values.get('loss_dino', values['loss']):.3f}) has stayed near or above ln(out_dim) = "
                f"{self.log_k:.3f} and the "
                f"teacher entropy at {100 * entropy:.0f}% of its maximum, so the teacher's "
                f"outputs are uniform. Lower loss.teacher_temp (0.04-0.07) and "
                f"loss.warmup_teacher_temp, and check the centering (loss.center_momentum 0.9)")
        if self._due("dimensional_collapse", one_hot):
            return HealthWarning(
                "dimensional_collapse",
                f"dimensional collapse: for {self.streaks['dimensional_collapse']} logging steps "
                f"the teacher entropy has been {100 * entropy:.1f}% of its maximum with only "
                f"{values['prototypes_used']} prototypes in use, so every image maps to the same "
                f"few outputs. Centering is too weak or sharpening too strong: keep "
                f"loss.center_momentum below 1 (the paper's 0.9 centers well) and raise "
                f"loss.teacher_temp")
        near = step > self.settle_steps and not (uniform or one_hot) and \
            values["prototype_share"] < NEAR_COLLAPSE_PROTOTYPE_SHARE and \
            values.get("agreement", 0.0) >= NEAR_COLLAPSE_AGREEMENT
        if self._due("near_collapse", near):
            return HealthWarning(
                "near_collapse",
                f"near collapse: for {self.streaks['near_collapse']} logging steps only "
                f"{values['prototypes_used']} prototypes "
                f"({100 * values['prototype_share']:.1f}% of those a batch can use) have taken "
                f"the teacher's argmax, and the student picks the teacher's prototype on "
                f"{100 * values['agreement']:.0f}% of the crop pairs (teacher entropy "
                f"{100 * entropy:.0f}% of its maximum): two crops are matched by a cue with "
                f"few values, not by their content, so the backbone learns little. Look for "
                f"what every crop of an image shares that no augmentation changes (a polarity, "
                f"a brightness, a colour cast) and vary it or take it out of the data; then "
                f"consider a larger model.out_dim and more epochs")
        return None

    def _patch_collapse(self, values: dict) -> HealthWarning | None:
        """The iBOT patch targets: uniform, or one-hot on a few prototypes (same thresholds as
        the CLS targets)."""
        if "patch_entropy_ratio" not in values:
            return None
        entropy, used = values["patch_entropy_ratio"], values["patch_prototypes_used"]
        few = used <= FEW_PROTOTYPES or values["patch_prototype_share"] < FEW_PROTOTYPES_SHARE
        if self._due("patch_uniform_collapse", entropy >= UNIFORM_ENTROPY_RATIO):
            return HealthWarning(
                "patch_uniform_collapse",
                f"iBOT patch targets uniform: for {self.streaks['patch_uniform_collapse']} "
                f"logging steps the teacher's masked-patch targets have had "
                f"{100 * entropy:.0f}% of the maximum entropy, so the patch loss teaches "
                f"nothing. Lower loss.teacher_temp, or try loss.centering=sinkhorn_knopp")
        if self._due("patch_dimensional_collapse", entropy < ONE_HOT_ENTROPY_RATIO and few):
            return HealthWarning(
                "patch_dimensional_collapse",
                f"iBOT patch collapse: for {self.streaks['patch_dimensional_collapse']} logging "
                f"steps the masked-patch targets have been one-hot on {used} prototypes, so "
                f"every patch maps to the same few outputs. Use loss.centering=sinkhorn_knopp "
                f"or raise loss.teacher_temp; ibot.separate_head=true gives patches their own "
                f"prototypes")
        return None

    def _gradients(self, values: dict) -> HealthWarning | None:
        norm = values.get("grad_norm", float("nan"))
        if not math.isfinite(norm):
            return None  # a skipped step: counted and handled by the engine
        recent = statistics.median(self.grad_norms) if len(self.grad_norms) >= 3 else None
        self.grad_norms.append(norm)
        if recent is None or norm <= GRAD_EXPLOSION_FACTOR * max(recent, 1e-12):
            return None
        return HealthWarning(
            "grad_explosion",
            f"gradient norm {norm:.3g} is {norm / max(recent, 1e-12):.0f}x its recent median "
            f"({recent:.3g}): training is becoming unstable. Lower optim.lr, keep gradient "
            f"clipping on (optim.clip_grad=3.0), or lengthen optim.warmup_epochs")

    def _fp16_skips(self, step: int, values: dict) -> HealthWarning | None:
        skipped = values.get("skipped_steps")
        if self.precision != "fp16" or skipped is None or self.last_skipped is None:
            return None
        new_skips, steps = skipped - self.last_skipped, max(step - self.last_step, 1)
        if step <= FP16_CALIBRATION_STEPS or new_skips < max(2, FP16_SKIP_SHARE * steps):
            return None
        return HealthWarning(
            "fp16_skips",
            f"{new_skips} of the last {steps} steps were skipped by the fp16 GradScaler "
            f"(inf/NaN gradients; scale now {values.get('grad_scale', float('nan')):g}): fp16 "
            f"overflows in this run. Switch to train.precision=bf16 (or fp32), or lower optim.lr")
