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
- the loss split by the student's view over the loss's pairs (teacher global crop i, student
  crop v != i): `loss_global` is the mean cross-entropy over the pairs whose student crop is
  another global crop, `loss_local` over those whose student crop is a local crop. The loss
  is their mix weighted by pair counts: (G(G-1) loss_global + G L loss_local) / (G(G+L-1))
  for G global and L local crops.
- agreement: over the same pairs, the share in which the student's argmax prototype on crop v
  equals the centred teacher's argmax on global crop i of the same image. It rises as the
  student learns to predict the teacher across views; near 1 with few prototypes in use is
  collapse, not learning.
- gradient norms per parameter group (backbone, head, last layer) before clipping, after
  unscaling.
- with the DINOv2 terms: each term's value (`loss_dino`, `loss_koleo`, `loss_ibot`; `loss` is
  their weighted sum, and the KL and the loss ratio are the DINO term's), and the iBOT patch
  targets' entropy and prototypes in use (`patch_entropy_ratio`, `patch_prototypes_used`,
  `patch_prototype_share`), read like the CLS ones.

The teacher figures are those of the targets the student was trained on: the centred softmax,
or Sinkhorn-Knopp's assignment.
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


def centred_targets(teacher_out: torch.Tensor, center: torch.Tensor,
                    teacher_temp: float) -> torch.Tensor:
    return F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1)


def entropy_sum(targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the entropy (nats) of probability rows (0 log 0 = 0)."""
    return torch.special.entr(targets.float()).sum()


def prototype_counts(teacher_out: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """How many rows pick each prototype as their argmax (float, so it can be all-reduced)."""
    winners = (teacher_out.float() - center).argmax(dim=-1)
    return torch.bincount(winners, minlength=teacher_out.shape[-1]).float()


def pair_cross_entropy(student_out: torch.Tensor, teacher_p: torch.Tensor, student_temp: float,
                       n_global_crops: int) -> torch.Tensor:
    """[G, V]: cross-entropy of the targets of teacher global crop i against student crop v,
    summed over the batch, computed as the DINO loss does (fp32). Outputs are crop-major. One
    student crop at a time, so the peak memory stays at the loss's own."""
    teacher_p = teacher_p.float().view(n_global_crops, -1, teacher_p.shape[-1])
    per_crop = []
    for student_crop in student_out.reshape(-1, *teacher_p.shape[1:]):
        student_logp = F.log_softmax(student_crop.float() / student_temp, dim=-1)
        per_crop.append(-(teacher_p * student_logp).sum(dim=(1, 2)))
    return torch.stack(per_crop, dim=1)


def pair_agreement(student_out: torch.Tensor, teacher_p: torch.Tensor,
                   n_global_crops: int) -> torch.Tensor:
    """[G, V]: images whose student argmax on crop v equals the argmax of the targets of
    global crop i (for the centred softmax: the centred teacher's argmax)."""
    teacher_wins = teacher_p.argmax(dim=-1).view(n_global_crops, 1, -1)
    batch = teacher_wins.shape[-1]
    student_wins = student_out.argmax(dim=-1).view(1, -1, batch)
    return (teacher_wins == student_wins).sum(dim=-1).float()


def loss_pair_masks(n_global_crops: int, n_crops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, V] masks of the loss's pairs (v != i): student crop global, student crop local."""
    teacher = torch.arange(n_global_crops).view(-1, 1)
    student = torch.arange(n_crops).view(1, -1)
    return (student < n_global_crops) & (student != teacher), \
        (student >= n_global_crops).expand(n_global_crops, n_crops)


def parameter_groups(student: nn.Module, trainable: list[nn.Parameter],
                     last_layer: list[nn.Parameter]) -> list[int]:
    """Index into GRAD_GROUPS for each trainable parameter, in `trainable`'s order."""
    last_ids = {id(p) for p in last_layer}
    head_ids = {id(p) for name, p in student.named_parameters() if name.startswith("head.")}
    return [2 if id(p) in last_ids else 1 if id(p) in head_ids else 0 for p in trainable]


# The sums after the prototype counts in the reduction buffer, in order. All are sums over
# images and ranks, so the all-reduced buffer holds the global batch's figures.
SUMS = ("entropy", "teacher_rows", "ce_global", "ce_local", "pairs_global", "pairs_local",
        "pairs_agreeing", "patch_entropy", "patch_rows", "loss_weight", "loss_dino",
        "loss_koleo", "loss_ibot")
LOSS_PARTS = ("dino", "koleo", "ibot")


class StepStatistics:
    """Accumulates one optimizer step's statistics on this rank; the engine reduces them."""

    def __init__(self, out_dim: int, groups: list[int], device: torch.device, patch_dim: int = 0):
        """`patch_dim`: the width of the iBOT patch targets (0: no patch figures)."""
        self.out_dim, self.patch_dim, self.device = out_dim, patch_dim, device
        self.groups = torch.tensor(groups, dtype=torch.long)
        self.reset()

    def reset(self) -> None:
        # [prototype counts (out_dim) | patch prototype counts (patch_dim) | SUMS]
        self.local = torch.zeros(self.out_dim + self.patch_dim + len(SUMS), device=self.device)
        self.reduced: torch.Tensor | None = None
        self.grad_norms: torch.Tensor | None = None
        self.parts_seen: set[str] = set()

    def _sum(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        return buffer[self.out_dim + self.patch_dim + SUMS.index(name)]

    def _add(self, name: str, value) -> None:
        self.local[self.out_dim + self.patch_dim + SUMS.index(name)] += value

    @torch.no_grad()
    def add_teacher(self, teacher_out: torch.Tensor, center: torch.Tensor,
                    teacher_temp: float) -> None:
        self.add_targets(centred_targets(teacher_out, center, teacher_temp))

    @torch.no_grad()
    def add_targets(self, teacher_p: torch.Tensor) -> None:
        """The teacher's targets for the global crops (probability rows)."""
        self.local[: self.out_dim] += torch.bincount(
            teacher_p.argmax(dim=-1), minlength=self.out_dim).float()
        self._add("entropy", entropy_sum(teacher_p))
        self._add("teacher_rows", teacher_p.shape[0])

    @torch.no_grad()
    def add_patch_targets(self, patch_p: torch.Tensor) -> None:
        """The iBOT targets of the masked patches (probability rows)."""
        if not self.patch_dim or patch_p.shape[0] == 0:
            return
        self.local[self.out_dim:self.out_dim + self.patch_dim] += torch.bincount(
            patch_p.argmax(dim=-1), minlength=self.patch_dim).float()
        self._add("patch_entropy", entropy_sum(patch_p))
        self._add("patch_rows", patch_p.shape[0])

    @torch.no_grad()
    def add_losses(self, parts, loss_weight: float) -> None:
        """Each term's value, weighted as the loss is (1/k per micro-batch); read back as
        their means over ranks."""
        self._add("loss_weight", loss_weight)
        for name in LOSS_PARTS:
            value = getattr(parts, name)
            if value is not None:
                self.parts_seen.add(name)
                self._add(f"loss_{name}", value.float() * loss_weight)

    def add_step_outputs(self, out, student_temp: float, n_global_crops: int,
                         loss_weight: float) -> None:
        """Everything a training micro-batch gives (training.forward.ForwardOutputs)."""
        self.add_targets(out.targets.cls)
        self.add_pair_targets(out.student, out.targets.cls, student_temp, n_global_crops)
        if out.targets.patch is not None:
            self.add_patch_targets(out.targets.patch)
        self.add_losses(out.parts, loss_weight)

    @torch.no_grad()
    def add_pairs(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                  center: torch.Tensor, teacher_temp: float, student_temp: float,
                  n_global_crops: int) -> None:
        self.add_pair_targets(student_out, centred_targets(teacher_out, center, teacher_temp),
                              student_temp, n_global_crops)

    @torch.no_grad()
    def add_pair_targets(self, student_out: torch.Tensor, teacher_p: torch.Tensor,
                         student_temp: float, n_global_crops: int) -> None:
        """The loss split by student view and the agreement, over the loss's pairs. Masked
        sums rather than boolean indexing, and pair counts from the host-side masks: no host
        synchronisation."""
        student_out = student_out.detach()
        batch = teacher_p.shape[0] // n_global_crops
        on_global, on_local = loss_pair_masks(n_global_crops, student_out.shape[0] // batch)
        self._add("pairs_global", int(on_global.sum()) * batch)
        self._add("pairs_local", int(on_local.sum()) * batch)
        ce = pair_cross_entropy(student_out, teacher_p, student_temp, n_global_crops)
        agreeing = pair_agreement(student_out, teacher_p, n_global_crops)
        on_global, on_local = on_global.to(ce.device), on_local.to(ce.device)
        self._add("ce_global", (ce * on_global).sum())
        self._add("ce_local", (ce * on_local).sum())
        self._add("pairs_agreeing", (agreeing * (on_global | on_local)).sum())

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
        parts = self._loss_parts(reduced)
        dino = parts.get("loss_dino", loss)  # the KL and the loss ratio are the DINO term's
        rows = max(float(self._sum(reduced, "teacher_rows")), 1.0)
        entropy = float(self._sum(reduced, "entropy")) / rows
        log_k = math.log(self.out_dim)
        used = int(torch.count_nonzero(reduced[: self.out_dim]))
        values = {"teacher_entropy": entropy, "entropy_ratio": entropy / log_k,
                  "kl": dino - entropy, "loss_ratio": dino / log_k,
                  "prototypes_used": used, "prototype_share": used / min(rows, self.out_dim),
                  **parts, **self._patch_values(reduced), **self._pair_values(reduced)}
        if self.grad_norms is not None:
            for name, norm in zip(GRAD_GROUPS, self.grad_norms.tolist()):
                values[f"grad_norm_{name}"] = norm
        return values

    def _loss_parts(self, reduced: torch.Tensor) -> dict[str, float]:
        """Each term's mean over ranks; nothing when the DINO term is the only one."""
        if self.parts_seen <= {"dino"}:
            return {}
        weight = max(float(self._sum(reduced, "loss_weight")), 1e-12)
        return {f"loss_{name}": float(self._sum(reduced, f"loss_{name}")) / weight
                for name in LOSS_PARTS if name in self.parts_seen}

    def _patch_values(self, reduced: torch.Tensor) -> dict[str, float]:
        rows = float(self._sum(reduced, "patch_rows"))
        if not self.patch_dim or rows == 0:
            return {}
        entropy = float(self._sum(reduced, "patch_entropy")) / rows
        used = int(torch.count_nonzero(reduced[self.out_dim:self.out_dim + self.patch_dim]))
        return {"patch_entropy_ratio": entropy / math.log(self.patch_dim),
                "patch_prototypes_used": used,
                "patch_prototype_share": used / min(rows, self.patch_dim)}

    def _pair_values(self, reduced: torch.Tensor) -> dict[str, float]:
        """loss_global, loss_local, agreement; a split with no pairs (one global crop, or no
        local crops) or a step without add_pairs reports nothing rather than 0/0."""
        pairs = {view: float(self._sum(reduced, f"pairs_{view}")) for view in ("global", "local")}
        values = {f"loss_{view}": float(self._sum(reduced, f"ce_{view}")) / count
                  for view, count in pairs.items() if count > 0}
        if sum(pairs.values()) > 0:
            values["agreement"] = float(self._sum(reduced, "pairs_agreeing")) / sum(pairs.values())
        return values


def state_values(center: torch.Tensor, scaler: torch.amp.GradScaler) -> dict[str, float]:
    """Figures that live in the training state: the center's norm and, under fp16, the scale."""
    values = {"center_norm": float(center.float().norm())}
    if scaler.is_enabled():
        values["grad_scale"] = float(scaler.get_scale())
    return values
