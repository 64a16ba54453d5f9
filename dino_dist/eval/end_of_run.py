"""The end-of-run k-NN report: the trained teacher beside a randomly initialised backbone.

Showing both numbers side by side is what tells a user that the run learned something,
rather than k-NN on raw pixel statistics.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from dino_dist.config import Config
from dino_dist.data import LabelledImageDataset, ensure_demo_dataset, eval_transform
from dino_dist.distributed.env import DistEnv
from dino_dist.eval.knn import knn_accuracy, live_backbone
from dino_dist.models import build_backbone

LOG = logging.getLogger("dino_dist")


KNN_SKIPPED = ("eval.knn_at_end=true, but data.path is not the demo and no labelled folders "
               "are set, so this run ends without a k-NN report: give eval.train_path=DIR "
               "eval.val_path=DIR (ImageFolder trees, one sub-folder per class) to get one, or "
               "set eval.knn_at_end=false to silence this")


def knn_folders(cfg: Config) -> tuple[str | Path, str | Path] | None:
    """Labelled train/val folders for k-NN: eval.train_path/val_path, else the demo's splits
    with data.path=demo, else None (nothing to evaluate on)."""
    if cfg.eval.train_path and cfg.eval.val_path:
        return cfg.eval.train_path, cfg.eval.val_path  # kept as given: an s3:// URL is no Path
    if cfg.data.path == "demo":
        root = ensure_demo_dataset(cfg.data.demo_dir or None, progress=False)
        return root / "train", root / "val"
    return None


KnnSets = tuple[LabelledImageDataset, LabelledImageDataset]


def knn_datasets(cfg: Config) -> KnnSets | None:
    """The k-NN train/val sets, scanned once at start so that a missing or empty folder
    stops the run before its first step (DataError), not after training."""
    folders = knn_folders(cfg)
    if folders is None:
        return None
    transform = eval_transform(cfg.eval.image_size)
    return LabelledImageDataset(folders[0], transform), LabelledImageDataset(folders[1], transform)


def plan_knn_at_end(cfg: Config, knn_sets: KnnSets | None) -> bool:
    """Whether the run ends with a k-NN report; says once, at start, why not when asked for."""
    if cfg.eval.knn_at_end and knn_sets is None:
        LOG.warning(KNN_SKIPPED)
    return cfg.eval.knn_at_end and knn_sets is not None


def random_init_backbone(cfg: Config) -> nn.Module:
    """The student's backbone exactly as it was before training (same seed, same init)."""
    torch.manual_seed(cfg.train.seed)
    return build_backbone(cfg.model.arch, cfg.model.patch_size, 0.0, cfg.model.img_size)


def report_knn_at_end(cfg: Config, env: DistEnv, teacher: nn.Module,
                      knn_sets: KnnSets) -> dict[str, float]:
    """Every rank: the teacher (sharded or not) and the random-init backbone on the k-NN sets."""
    train_set, val_set = knn_sets
    e = cfg.eval
    scores = {}
    with live_backbone(teacher) as teacher_backbone:
        backbones = (("", teacher_backbone),
                     ("_random_init", random_init_backbone(cfg).to(env.device)))
        for suffix, backbone in backbones:
            top1, top5 = knn_accuracy(backbone, train_set, val_set, env, e.knn_k,
                                      e.knn_temperature, e.batch_size)
            scores[f"knn_top1{suffix}"], scores[f"knn_top5{suffix}"] = top1, top5
    LOG.info("k-NN (k=%d) on %s: teacher top-1 %.2f%% top-5 %.2f%% | random init top-1 %.2f%% "
             "top-5 %.2f%%", e.knn_k, val_set.root, scores["knn_top1"], scores["knn_top5"],
             scores["knn_top1_random_init"], scores["knn_top5_random_init"])
    return scores
