"""The datasets the trainer and the evaluations read, over a folder or a shard set alike."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dino_dist.errors import DataError

from .augment import sample_seed
from .folder import KNN_HINT, PATH_HINT, FolderImages
from .images import ImageSet
from .shard_images import READ_THREADS, ShardImages
from .shard_set import looks_like_shard_set
from .shard_store import RETRY_S


def open_images(path: str | Path, what: str = "data.path", hint: str = PATH_HINT,
                read_threads: int = READ_THREADS, cache_dir: str | None = None,
                retry_s: float = RETRY_S) -> ImageSet:
    """A folder of images, or the shard set data.path names (s3://, a .tar pattern, a folder of
    .tar shards); a path that is neither gets one DataError naming `what` and the fix."""
    if looks_like_shard_set(str(path)):
        return ShardImages(str(path), cache_dir, read_threads, retry_s)
    return FolderImages(path, what, hint)


class MultiCropDataset:
    """Indexed by (epoch, index); returns (crops, label, skipped).

    A sample's crops depend only on (seed, epoch, index): the augmentation runs
    under a private RNG seeded from those, so worker count, rank and whatever
    ran before in the process make no difference.
    """

    def __init__(self, images: ImageSet | str | Path, augmentation: Callable[[torch.Tensor], list[torch.Tensor]],
                 seed: int, masking: Callable[[int], torch.Tensor] | None = None) -> None:
        """`masking` (iBOT, data.masking.MaskSampler): seed -> the sample's global-crop patch
        masks, drawn from a stream of the sample's own seed; a sample is then
        (crops, label, skipped, masks)."""
        self.images = images if isinstance(images, ImageSet) else open_images(images)
        self.augmentation = augmentation
        self.seed = seed
        self.masking = masking

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[tuple]:
        self.images.prefetch([index for _, index in keys])
        return [self[key] for key in keys]

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        epoch, index = key
        image, label, skipped = self.images.load_or_next(index)
        # The caller's CPU RNG is restored afterwards, so sampling here never perturbs
        # training randomness in the main process. The generator is seeded directly:
        # torch.manual_seed also walks the CUDA generators and costs ~100x more per call.
        caller_state = torch.get_rng_state()
        torch.random.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            crops = self.augmentation(image)
        finally:
            torch.set_rng_state(caller_state)
        if self.masking is None:
            return crops, label, skipped
        return crops, label, skipped, self.masking(sample_seed(self.seed, epoch, index, "masks"))


class LabelledImageDataset:
    """(image, label) pairs from an ImageFolder tree or a labelled shard set, for evaluation."""

    def __init__(self, root: str | Path, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images = open_images(root, what="evaluation folder", hint=KNN_HINT)
        if not self.images.classes:
            raise DataError(f"evaluation data '{root}' has no labels (no class sub-folders, no .cls "
                            f"in its shards): {KNN_HINT}")
        self.root = root
        self.transform = transform

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        self.images.prefetch(indices)
        return [self[index] for index in indices]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, _ = self.images.load_or_next(index)
        return self.transform(image), label
