"""The end-of-run k-NN report: the trained teacher beside a randomly initialised backbone.

Showing both numbers side by side is what tells a user that the run learned something,
rather than k-NN on raw pixel statistics.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from dino_dist.config import Config, ConfigError
from dino_dist.data import LabelledImageDataset, ensure_demo_dataset, eval_transform
from dino_dist.dist import DistEnv
from dino_dist.knn import knn_accuracy
from dino_dist.metrics import MetricsWriter
from dino_dist.models import build_backbone

LOG = logging.getLogger("dino_dist")


def knn_folders(cfg: Config) -> tuple[Path, Path]:
    if cfg.eval.train_path and cfg.eval.val_path:
        return Path(cfg.eval.train_path), Path(cfg.eval.val_path)
    if cfg.data.path == "demo":
        root = ensure_demo_dataset(cfg.data.demo_dir or None, progress=False)
        return root / "train", root / "val"
    raise ConfigError("eval.knn_at_end needs eval.train_path and eval.val_path "
                      "(labelled ImageFolder trees) unless data.path=demo")


def random_init_backbone(cfg: Config) -> nn.Module:
    """The student's backbone exactly as it was before training (same seed, same init)."""
    torch.manual_seed(cfg.train.seed)
    return build_backbone(cfg.model.arch, cfg.model.patch_size, 0.0, cfg.model.img_size)


def report_knn_at_end(cfg: Config, env: DistEnv, teacher: nn.Module, metrics: MetricsWriter,
                      step: int) -> dict[str, float]:
    train_dir, val_dir = knn_folders(cfg)
    transform = eval_transform(cfg.eval.image_size)
    train_set = LabelledImageDataset(train_dir, transform)
    val_set = LabelledImageDataset(val_dir, transform)
    e = cfg.eval
    scores = {}
    for suffix, backbone in (("", teacher.backbone),
                             ("_random_init", random_init_backbone(cfg).to(env.device))):
        top1, top5 = knn_accuracy(backbone, train_set, val_set, env, e.knn_k,
                                  e.knn_temperature, e.batch_size)
        scores[f"knn_top1{suffix}"], scores[f"knn_top5{suffix}"] = top1, top5
    LOG.info("k-NN (k=%d) on %s: teacher top-1 %.2f%% top-5 %.2f%% | random init top-1 %.2f%% "
             "top-5 %.2f%%", e.knn_k, val_dir, scores["knn_top1"], scores["knn_top5"],
             scores["knn_top1_random_init"], scores["knn_top5_random_init"])
    metrics.write(step, scores)
    return scores
