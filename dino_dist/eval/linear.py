"""The linear probe: a linear classifier trained on a frozen backbone's cached features.

DINO's eval_linear recipe: one linear layer (no BatchNorm), SGD with momentum 0.9, lr
`lr * batch / 256` on a cosine over the epochs, weight decay 0 by default. Data-parallel
without a wrapper: every rank holds the cached features and the same classifier, takes its
slice of each global batch, and the gradients (of the loss summed over the slice and divided
by the global batch size) are summed over ranks, so N ranks take the very steps of one
process. After each epoch rank 0 saves classifier, optimizer and epoch; a restart with the
same output folder continues from there.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dino_dist.checkpoint.files import atomic_write
from dino_dist.data import LabelledImageDataset, sample_seed
from dino_dist.distributed.collectives import all_reduce_sum_
from dino_dist.distributed.env import DistEnv
from dino_dist.errors import ConfigError, DataError
from dino_dist.eval.backbone import backbone_from_checkpoint
from dino_dist.eval.linear_features import (FeatureSettings, cache_path, cached_features,
                                            default_n_last_blocks, feature_function, transforms)
from dino_dist.observe.metrics import MetricsWriter, setup_logging

LOG = logging.getLogger("dino_dist")
STATE_FILE = "classifier.pt"
EVAL_CHUNK = 4096  # validation rows per matmul: bounds the logits' memory


@dataclass(frozen=True)
class ProbeSettings:
    epochs: int
    batch_size: int      # the global batch, split over ranks
    lr: float            # for a batch of 256
    weight_decay: float
    seed: int


def labelled_sets(train_dir: str | Path, val_dir: str | Path,
                  settings: FeatureSettings) -> list[LabelledImageDataset]:
    """Both folders under their extraction transforms; they must name the same classes."""
    train_set, val_set = (LabelledImageDataset(d, t)
                          for d, t in zip((train_dir, val_dir), transforms(settings)))
    if train_set.classes != val_set.classes:  # both sorted: only different names differ
        differ = sorted(set(train_set.classes) ^ set(val_set.classes))
        raise DataError(f"--train-data '{train_dir}' and --val-data '{val_dir}' have different "
                        f"class folders ({', '.join(differ[:5])}): give both the same classes")
    return [train_set, val_set]


def lr_at(settings: ProbeSettings, epoch: int) -> float:
    # Per epoch, as DINO's CosineAnnealingLR stepped once an epoch (to 0 after the last).
    peak = settings.lr * settings.batch_size / 256.0
    return 0.5 * peak * (1.0 + math.cos(math.pi * epoch / settings.epochs))


def hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[top-1 hits, top-5 hits, count] of a batch on the logits' device, as float64 for
    exact sums over ranks; no host sync (the caller reads its totals once)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.to(logits.device)[:, None]
    return torch.stack([top[:, 0].sum(), top.any(dim=1).sum(),
                        torch.tensor(len(labels), device=logits.device)]).to(torch.float64)


def train_epoch(classifier: nn.Linear, optimizer, features: torch.Tensor, labels: torch.Tensor,
                settings: ProbeSettings, epoch: int, env: DistEnv) -> dict[str, float]:
    for group in optimizer.param_groups:
        group["lr"] = lr_at(settings, epoch)
    # loss sum, top-1, top-5, count: kept on the device, read once after the epoch
    totals = torch.zeros(4, dtype=torch.float64, device=env.device)
    # Index -1 is no image's, so the order's seed is never an augmented view's.
    shuffle = torch.Generator().manual_seed(sample_seed(settings.seed, epoch, -1))
    for batch in torch.randperm(len(labels), generator=shuffle).split(settings.batch_size):
        mine = batch[env.rank::env.world_size]  # any split will do: gradients are summed
        logits = classifier(features[mine].to(env.device))
        loss_sum = F.cross_entropy(logits, labels[mine].to(env.device), reduction="sum")
        optimizer.zero_grad()
        (loss_sum / len(batch)).backward()
        for param in classifier.parameters():
            all_reduce_sum_(param.grad)
        optimizer.step()
        totals[0] += loss_sum.detach()
        totals[1:] += hits(logits.detach(), labels[mine])
    all_reduce_sum_(totals)
    loss, top1, top5, count = totals.tolist()
    return {"lr": lr_at(settings, epoch), "train_loss": loss / count,
            "train_top1": 100 * top1 / count, "train_top5": 100 * top5 / count}


@torch.no_grad()
def evaluate(classifier: nn.Linear, features: torch.Tensor, labels: torch.Tensor,
             env: DistEnv) -> dict[str, float]:
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)
    rows = torch.arange(env.rank, len(labels), env.world_size)
    for chunk in rows.split(EVAL_CHUNK):
        totals += hits(classifier(features[chunk].to(env.device)), labels[chunk])
    all_reduce_sum_(totals)
    top1, top5, count = totals.tolist()
    return {"val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count}


def new_classifier(dim: int, classes: int, seed: int) -> nn.Linear:
    classifier = nn.Linear(dim, classes)
    nn.init.normal_(classifier.weight, std=0.01, generator=torch.Generator().manual_seed(seed))
    nn.init.zeros_(classifier.bias)  # DINO's LinearClassifier initialisation
    return classifier


def resume(path: Path, classifier: nn.Linear, optimizer, identity: dict) -> tuple[int, dict]:
    """(epochs done, their last metrics) in this output folder, (0, {}) for a new one."""
    if not path.is_file():
        return 0, {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["identity"] != identity:
        raise ConfigError(f"'{path.parent}' holds a probe of another checkpoint, data or "
                          "settings: give the same options to continue it, or another --output-dir")
    classifier.load_state_dict(state["classifier"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"], state["metrics"]


def last_logged_epoch(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1])["epoch"] if lines else 0


def linear_probe(checkpoint: Path, train_dir: str | Path, val_dir: str | Path, output_dir: Path,
                 requested: FeatureSettings, settings: ProbeSettings, env: DistEnv,
                 num_workers: int = 0) -> dict[str, float]:
    """Train (or continue) the probe to `settings.epochs`; the last epoch's metrics."""
    backbone, cfg = backbone_from_checkpoint(checkpoint, env.device)
    features = replace(
        requested,
        n_last_blocks=requested.n_last_blocks or default_n_last_blocks(cfg.model.arch),
        image_size=requested.image_size or cfg.eval.image_size)
    train_set, val_set = labelled_sets(train_dir, val_dir, features)
    extractor = feature_function(backbone, features)
    setup_logging(output_dir, env.is_main)  # only now: bad input leaves no folder behind
    cache = cache_path(output_dir, checkpoint, train_set.images.identity, val_set.images.identity, features)
    data = cached_features(cache, extractor, train_set, val_set, features, env,
                           settings.batch_size, num_workers)
    # A restart continues only the same probe; it may ask for more epochs.
    same_probe = {"cache": cache.name, **asdict(settings)}
    del same_probe["epochs"]
    about = {"classes": train_set.classes, "arch": cfg.model.arch, "features": asdict(features),
             "identity": same_probe}
    return train_probe(data, settings, output_dir, about, env)


def train_probe(data: dict, settings: ProbeSettings, output_dir: Path, about: dict,
                env: DistEnv) -> dict[str, float]:
    """The epochs not done yet: train, evaluate, save (rank 0), log. `about` goes into the
    saved state; its `identity` must match to continue (more epochs may be asked for)."""
    classifier = new_classifier(data["val"].shape[1], len(about["classes"]), settings.seed)
    classifier.to(env.device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr_at(settings, 0), momentum=0.9,
                                weight_decay=settings.weight_decay)
    done, metrics = resume(output_dir / STATE_FILE, classifier, optimizer, about["identity"])
    writer = MetricsWriter(output_dir, enabled=env.is_main)
    if env.is_main and done > last_logged_epoch(output_dir):  # killed between save and log
        writer.write(done, metrics)
    for epoch in range(done, settings.epochs):
        view = data["train"][epoch % len(data["train"])]  # the cached views take turns
        trained = train_epoch(classifier, optimizer, view, data["train_labels"], settings,
                              epoch, env)
        metrics = {"epoch": epoch + 1, **trained,
                   **evaluate(classifier, data["val"], data["val_labels"], env)}
        if env.is_main:
            state = {"classifier": classifier.state_dict(), "optimizer": optimizer.state_dict(),
                     "epoch": epoch + 1, "metrics": metrics, **about}
            atomic_write(output_dir / STATE_FILE, lambda f: torch.save(state, f))
        writer.write(epoch + 1, metrics)
        LOG.info("epoch %d/%d lr %.2e loss %.4f train top-1 %.2f%% top-5 %.2f%% | val top-1 "
                 "%.2f%% top-5 %.2f%%", epoch + 1, settings.epochs, metrics["lr"],
                 metrics["train_loss"], metrics["train_top1"], metrics["train_top5"],
                 metrics["val_top1"], metrics["val_top5"])
    writer.close()
    return metrics
