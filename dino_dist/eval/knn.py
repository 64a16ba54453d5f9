"""Weighted k-NN classification on L2-normalised backbone features (the DINO paper's protocol).

Feature extraction is sharded over ranks (each rank takes every world_size-th image) and the
features are gathered on every rank, so `dino-knn` under torchrun is N times faster.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dino_dist.distributed.parallel import release_gathered_parameters
from dino_dist.distributed.collectives import all_gather_objects
from dino_dist.distributed.env import DistEnv


def rank_batches(num_items: int, env: DistEnv, batch_size: int) -> tuple[list[list[int]], int]:
    """This rank's share of the items in batches (every world_size-th item), and how many
    stand-in batches it must run on top so that every rank runs as many forwards.

    A sharded (FSDP) forward is a collective: a rank that ran one batch fewer would leave
    the others waiting in an all-gather.
    """
    shard = list(range(env.rank, num_items, env.world_size))
    batches = [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]
    per_rank = -(-(-(-num_items // env.world_size)) // batch_size)
    return batches, per_rank - len(batches)


@contextlib.contextmanager
def live_backbone(model: nn.Module):
    """Images -> backbone features of a training model (MultiCropWrapper), sharded or not,
    in eval mode; the model's mode is restored and a sharded root's parameters released."""
    was_training = model.training
    model.eval()
    try:
        yield lambda images: model(images, output="backbone")
    finally:
        model.train(was_training)
        release_gathered_parameters(model)


@torch.no_grad()
def extract_features(backbone: Callable[[torch.Tensor], torch.Tensor], dataset, env: DistEnv,
                     batch_size: int, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] as the backbone gives them, labels [N]) for the whole dataset, on
    every rank (k-NN L2-normalises them; the linear probe reads them raw).

    `backbone` maps an image batch to features (a bare backbone, or `live_backbone(model)`);
    a bare module is put in eval mode.
    """
    if isinstance(backbone, nn.Module):
        backbone.eval()
    batches, stand_ins = rank_batches(len(dataset), env, batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    features, labels = [], []
    for images, targets in loader:
        out = backbone(images.to(env.device)).float()
        features.append(out.cpu())
        labels.append(torch.as_tensor(targets))
    for _ in range(stand_ins):  # output dropped: only keeps the collectives in step
        backbone(dataset[0][0].unsqueeze(0).to(env.device))
    shard = [i for batch in batches for i in batch]
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


def knn_accuracy(backbone: Callable[[torch.Tensor], torch.Tensor], train_set, val_set, env: DistEnv, k: int,
                 temperature: float, batch_size: int, num_workers: int = 0) -> tuple[float, float]:
    train_f, train_l = extract_features(backbone, train_set, env, batch_size, num_workers)
    val_f, val_l = extract_features(backbone, val_set, env, batch_size, num_workers)
    return knn_classify(F.normalize(train_f, dim=1), train_l, F.normalize(val_f, dim=1), val_l,
                        k, temperature)
