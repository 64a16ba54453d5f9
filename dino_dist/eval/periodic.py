"""Evaluation during training (`eval.every_epochs`): k-NN accuracy on a labelled validation
folder and a validation DINO loss on held-out images, the best value so far, and early stopping.

Every rank runs the evaluation (feature extraction and the loss are sharded over the ranks),
then rank 0's figures are broadcast, so every rank takes the same best/early-stopping decision
at the same epoch end and all stop together. The evaluation runs with the models in eval mode
and under saved-and-restored RNG states, so it changes nothing in training: a run with it
trains the same weights as one without.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dino_dist.distributed.parallel import release_gathered_parameters
from dino_dist.distributed.rng import rng_state, set_rng_state
from dino_dist.config import Config
from dino_dist.data import MultiCropAugmentation, MultiCropDataset, collate_multicrop, demo_val_root
from dino_dist.distributed.collectives import all_reduce_sum_, broadcast_object
from dino_dist.distributed.env import DistEnv
from dino_dist.eval.knn import knn_accuracy, live_backbone, rank_batches

LOG = logging.getLogger("dino_dist")
LOWER_IS_BETTER = ("val_loss",)


@dataclass
class MetricTracker:
    """Best value of one metric so far and how many evaluations in a row did not beat it."""
    metric: str
    mode: str  # max | min
    min_delta: float = 0.0
    best: float | None = None
    best_step: int = -1
    best_epoch: int = -1
    evals_without_improvement: int = 0

    def update(self, value: float, step: int, epoch: int) -> bool:
        """True when `value` beats the best by more than min_delta (the first value always does)."""
        if self.best is None:
            gain = float("inf")
        else:
            gain = value - self.best if self.mode == "max" else self.best - value
        if gain > self.min_delta:
            self.best, self.best_step, self.best_epoch = value, step, epoch
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False


def resolve_mode(metric: str, mode: str = "auto") -> str:
    return mode if mode != "auto" else ("min" if metric in LOWER_IS_BETTER else "max")


class PeriodicEvaluation:
    def __init__(self, cfg: Config, env: DistEnv, engine, teacher, knn_sets=None):
        """`knn_sets`: eval.end_of_run.knn_datasets(cfg), scanned once for this and the end report."""
        self.cfg, self.env, self.engine, self.teacher = cfg, env, engine, teacher
        self.every = cfg.eval.every_epochs
        e = cfg.eval
        self.knn_sets = knn_sets
        self.val_loss_dir = e.val_loss_path if e.val_loss_path else \
            (demo_val_root(cfg.data) if cfg.data.path == "demo" else None)
        available = (["knn_top1", "knn_top5"] if self.knn_sets else []) + \
            (["val_loss"] if self.val_loss_dir else [])
        if self.every and not available:
            if not cfg.eval.attention_images:  # the attention grid alone is an evaluation too
                LOG.warning("eval.every_epochs=%d, but there is nothing to evaluate on, so no "
                            "evaluation runs during training: set eval.train_path and "
                            "eval.val_path (labelled ImageFolder trees) for k-NN, or "
                            "eval.val_loss_path (held-out images) for a validation loss",
                            self.every)
            self.every = 0
        best_metric = e.best_metric if e.best_metric != "auto" else (available[0] if available else "")
        self.best = MetricTracker(best_metric, resolve_mode(best_metric)) if self.every and best_metric else None
        stop = cfg.train.early_stopping
        self.early = MetricTracker(stop.metric, resolve_mode(stop.metric, stop.mode),
                                   stop.min_delta) if stop.enabled else None
        self.last_improved_step = -1  # the step whose state is the new best: save it
        self._val_set = None

    def due(self, epochs_done: int) -> bool:
        return bool(self.every) and epochs_done % self.every == 0

    def state_dict(self) -> dict:
        return {"best": asdict(self.best) if self.best else None,
                "early_stopping": asdict(self.early) if self.early else None}

    def load_state_dict(self, state: dict | None) -> None:
        for name in ("best", "early_stopping"):
            tracker = self.best if name == "best" else self.early
            saved = (state or {}).get(name)
            if tracker is not None and saved and saved.get("metric") == tracker.metric:
                for key in ("best", "best_step", "best_epoch", "evals_without_improvement"):
                    setattr(tracker, key, saved[key])

    def run(self, step: int, epoch: int, schedule_step: int) -> tuple[dict, str | None]:
        """Evaluate (all ranks); returns (figures, early-stopping reason or None)."""
        saved_rng = rng_state()
        try:
            values = self._measure(schedule_step)
        finally:
            set_rng_state(saved_rng)
        values = broadcast_object(values)  # one truth for every rank's decisions
        LOG.info("evaluation at epoch %d (step %d): %s", epoch, step,
                 " ".join(f"{k} {v:.4f}" for k, v in values.items()))
        if self.best and self.best.metric in values and \
                self.best.update(values[self.best.metric], step, epoch):
            self.last_improved_step = step
            values[f"best_{self.best.metric}"] = self.best.best
        return values, self._early_stop(values, step, epoch)

    def _early_stop(self, values: dict, step: int, epoch: int) -> str | None:
        if self.early is None or self.early.metric not in values:
            return None
        self.early.update(values[self.early.metric], step, epoch)
        return self.stopped_early()

    def stopped_early(self) -> str | None:
        """The early-stopping reason once patience is used up (also right after a resume of a
        run that had stopped early: it stays stopped)."""
        e, patience = self.early, self.cfg.train.early_stopping.patience
        if e is None or e.best is None:
            return None
        if e.evals_without_improvement < patience:
            return None
        return (f"early stopping: {e.metric} did not improve by more than {e.min_delta:g} in "
                f"{e.evals_without_improvement} evaluations (best {e.best:.4f} at epoch "
                f"{e.best_epoch}, step {e.best_step})")

    def _measure(self, schedule_step: int) -> dict:
        modules = (self.teacher, self.engine.student)
        modes = [m.training for m in modules]
        for module in modules:
            module.eval()
        try:
            values = {}
            if self.knn_sets:
                values.update(self._knn())
            if self.val_loss_dir:
                values["val_loss"] = self._val_loss(schedule_step)
            return values
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)

    def _knn(self) -> dict:
        e = self.cfg.eval
        with live_backbone(self.teacher) as teacher_backbone:
            top1, top5 = knn_accuracy(teacher_backbone, *self.knn_sets, self.env, e.knn_k,
                                      e.knn_temperature, e.batch_size)
        return {"knn_top1": top1, "knn_top5": top5}

    @torch.no_grad()
    def _val_loss(self, schedule_step: int) -> float:
        """The DINO loss on held-out images, with crops fixed by (seed, index) at every
        evaluation, the current center and teacher temperature; sharded over the ranks."""
        d = self.cfg.data
        if self._val_set is None:
            # The CPU augmentation whatever data.augment_on says: the same recipe, and these
            # few batches are not worth a device-side path of their own.
            self._val_set = MultiCropDataset(self.val_loss_dir, MultiCropAugmentation.from_config(d),
                                             self.cfg.train.seed)
        batches, stand_ins = rank_batches(len(self._val_set), self.env, self.cfg.eval.batch_size)
        loader = DataLoader(self._val_set, batch_sampler=[[(0, i) for i in b] for b in batches],
                            collate_fn=collate_multicrop)
        engine = self.engine
        temp = engine.schedules.teacher_temp_at(schedule_step)
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for crops, _labels, _skipped in loader:
            loss, images = self._loss_of(crops, temp)
            total += torch.stack((loss.double() * images,
                                  torch.tensor(images, dtype=torch.float64, device=self.env.device)))
        for _ in range(stand_ins):  # dropped: keeps a sharded model's collectives in step
            self._loss_of(collate_multicrop([self._val_set[(0, 0)]])[0], temp)
        for model in (self.teacher, engine.student):
            release_gathered_parameters(model)
        loss_sum, count = all_reduce_sum_(total).tolist()
        return loss_sum / max(count, 1)

    def _loss_of(self, crops: list[torch.Tensor], temp: float) -> tuple[torch.Tensor, int]:
        crops = [c.to(self.env.device) for c in crops]
        # Training's own forward, given the bare student: a DDP wrapper would sync buffers.
        loss = self.engine.forward(self.engine.student, crops, temp).loss
        return loss, len(crops[0])
