"""Data: multi-crop augmentation (in the loader or on the device; recipe.py holds the recipe
and says which path is used when), image folders, the demo dataset and the train loader."""

from .augment import MultiCropAugmentation, eval_transform, sample_seed
from .batch import split_batch
from .demo import default_demo_dir, ensure_demo_dataset
from .device_augment import DecodedBatch, crops_on_device
from .datasets import LabelledImageDataset, MultiCropDataset, open_images
from .folder import DataError, find_images
from .loader import (build_train_loader, collate_multicrop, demo_val_root, loader_transform,
                     resolve_data_root)
from .recipe import CropRecipe
from .sampler import ShardedEpochSampler

__all__ = [
    "CropRecipe",
    "DataError",
    "DecodedBatch",
    "LabelledImageDataset",
    "MultiCropAugmentation",
    "MultiCropDataset",
    "ShardedEpochSampler",
    "build_train_loader",
    "collate_multicrop",
    "crops_on_device",
    "default_demo_dir",
    "demo_val_root",
    "ensure_demo_dataset",
    "eval_transform",
    "find_images",
    "loader_transform",
    "open_images",
    "resolve_data_root",
    "sample_seed",
    "split_batch",
]
