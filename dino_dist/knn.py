"""Weighted k-NN classification on L2-normalised backbone features (the DINO paper's protocol).

Feature extraction is sharded over ranks (each rank takes every world_size-th image) and the
features are gathered on every rank, so `dino-knn` under torchrun is N times faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from dino_dist.dist import DistEnv, all_gather_objects


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset, env: DistEnv, batch_size: int,
                     num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] L2-normalised, labels [N]) for the whole dataset, on every rank."""
    backbone.eval()
    shard = list(range(env.rank, len(dataset), env.world_size))
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, num_workers=num_workers)
    features, labels = [], []
    for images, targets in loader:
        out = backbone(images.to(env.device)).float()
        features.append(F.normalize(out, dim=1).cpu())
        labels.append(torch.as_tensor(targets))
    local = (torch.tensor(shard, dtype=torch.long),
             torch.cat(features) if features else torch.empty(0),
             torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))
    order, feats, labs = zip(*all_gather_objects(local))
    order = torch.cat(order)
    feats = torch.cat([f for f in feats if f.numel()])
    labs = torch.cat(labs)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return feats[inverse], labs[inverse]


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, k: int = 20,
                 temperature: float = 0.07, chunk: int = 256) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (in %) of similarity-weighted voting among the k nearest."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_labels))
    top1 = top5 = 0
    for start in range(0, len(test_labels), chunk):
        feats = test_features[start:start + chunk]
        targets = test_labels[start:start + chunk]
        similarity, indices = (feats @ train_features.T).topk(k, dim=1)
        neighbour_labels = train_labels[indices]
        votes = torch.zeros(len(feats), num_classes)
        votes.scatter_add_(1, neighbour_labels, (similarity / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True)
        top1 += (ranked[:, 0] == targets).sum().item()
        top5 += (ranked[:, : min(5, num_classes)] == targets[:, None]).any(dim=1).sum().item()
    n = len(test_labels)
    return 100.0 * top1 / n, 100.0 * top5 / n


def knn_accuracy(backbone: nn.Module, train_set, val_set, env: DistEnv, k: int,
                 temperature: float, batch_size: int, num_workers: int = 0) -> tuple[float, float]:
    train_f, train_l = extract_features(backbone, train_set, env, batch_size, num_workers)
    val_f, val_l = extract_features(backbone, val_set, env, batch_size, num_workers)
    return knn_classify(train_f, train_l, val_f, val_l, k, temperature)
