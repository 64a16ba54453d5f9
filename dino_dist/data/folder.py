"""Image datasets read from a folder: an ImageFolder tree or a plain folder of images."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from dino_dist.errors import DataError

from .augment import sample_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
PATH_HINT = "set data.path to an ImageFolder root, a folder of images, or 'demo'"
KNN_HINT = "k-NN evaluation needs an ImageFolder tree with one sub-folder per class"
MAX_CONSECUTIVE_BAD_IMAGES = 50

# Decoders signal a bad file with any of these; anything else is a real bug.
DECODE_ERRORS = (OSError, RuntimeError, ValueError, Image.DecompressionBombError)


def is_image(path: Path) -> bool:
    # Dot-files are skipped: macOS '._x.jpg' resource forks look like images but are not.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def images_under(folder: Path) -> list[str]:
    """Image files under `folder`, sorted, recursively (hidden folders skipped, links followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(str(Path(dirpath, name)) for name in sorted(filenames) if is_image(Path(name)))
    return found


def _check_root(root: Path, what: str, hint: str) -> None:
    if not root.exists():
        raise DataError(f"{what} '{root}' does not exist: {hint}")
    if not root.is_dir():
        raise DataError(f"{what} '{root}' is a file, not a folder: {hint}")


def find_images(root: str | Path, what: str = "data.path", hint: str = PATH_HINT) -> tuple[list[str], list[int], list[str]]:
    """List (files, labels, classes) under root.

    With class sub-folders, each (sorted) sub-folder is a class and is searched
    recursively. Without them, the top-level images are returned with label -1
    and no classes. `what` and `hint` name the setting in error messages.
    """
    root = Path(root).expanduser()
    _check_root(root, what, hint)
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    loose_images = [str(p) for p in entries if p.is_file() and is_image(p)]
    if not class_dirs:
        if not loose_images:
            raise DataError(f"{what} '{root}' contains no images ({', '.join(IMAGE_EXTENSIONS)}): {hint}")
        return loose_images, [-1] * len(loose_images), []
    if loose_images:
        raise DataError(
            f"{what} '{root}' mixes images and class sub-folders: move '{Path(loose_images[0]).name}' "
            "and the other loose images into a class sub-folder, or remove the sub-folders"
        )
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        class_files = images_under(class_dir)
        if not class_files:
            raise DataError(f"class folder '{class_dir}' contains no images: add images to it or remove it")
        files.extend(class_files)
        labels.extend([label] * len(class_files))
    return files, labels, [p.name for p in class_dirs]


def decode_rgb(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 RGB CHW tensor, via PIL if torchvision cannot."""
    with open(path, "rb") as handle:
        encoded = torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)
    try:
        image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except DECODE_ERRORS:
        # torchvision decodes jpeg/png/webp/gif; bmp, tiff and ppm go through PIL.
        with Image.open(path) as pil_image:
            array = np.asarray(pil_image.convert("RGB"))
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    # 16-bit PNGs decode to uint16; the augmentations expect uint8.
    return image if image.dtype == torch.uint8 else TF.to_dtype(image, torch.uint8, scale=True)


class _FolderImages:
    """Shared file listing plus the skip-corrupt-images policy."""

    def __init__(self, files: list[str], labels: list[int], classes: list[str]) -> None:
        self.files, self.labels, self.classes = files, labels, classes
        # Per process (each DataLoader worker has its own copy): warn once per file.
        self._warned_files: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _load_or_next(self, index: int) -> tuple[torch.Tensor, int, int]:
        """Decode files[index]; on a bad file move on to index+1 (deterministic).

        Returns (image, label, number of bad files skipped).
        """
        attempts = min(MAX_CONSECUTIVE_BAD_IMAGES, len(self.files))
        for skipped in range(attempts):
            current = (index + skipped) % len(self.files)
            try:
                return decode_rgb(self.files[current]), self.labels[current], skipped
            except DECODE_ERRORS as error:
                self._warn_bad_file(self.files[current], error)
        raise DataError(
            f"{attempts} consecutive images from '{self.files[index]}' on could not be decoded: "
            "check that the data folder holds valid image files"
        )

    def _warn_bad_file(self, path: str, error: Exception) -> None:
        if path in self._warned_files:
            return
        self._warned_files.add(path)
        warnings.warn(f"skipping unreadable image '{path}' ({type(error).__name__}: {error})", stacklevel=3)


class MultiCropDataset(_FolderImages):
    """Indexed by (epoch, index); returns (crops, label, skipped).

    A sample's crops depend only on (seed, epoch, index): the augmentation runs
    under a private RNG seeded from those, so worker count, rank and whatever
    ran before in the process make no difference.
    """

    def __init__(self, root: str | Path, augmentation: Callable[[torch.Tensor], list[torch.Tensor]], seed: int) -> None:
        super().__init__(*find_images(root))
        self.root = Path(root)
        self.augmentation = augmentation
        self.seed = seed

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int, int]:
        epoch, index = key
        image, label, skipped = self._load_or_next(index)
        # The caller's CPU RNG is restored afterwards, so sampling here never perturbs
        # training randomness in the main process. The generator is seeded directly:
        # torch.manual_seed also walks the CUDA generators and costs ~100x more per call.
        caller_state = torch.get_rng_state()
        torch.random.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            crops = self.augmentation(image)
        finally:
            torch.set_rng_state(caller_state)
        return crops, label, skipped


class LabelledImageDataset(_FolderImages):
    """(image, label) pairs from an ImageFolder tree, for k-NN evaluation."""

    def __init__(self, root: str | Path, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        files, labels, classes = find_images(root, what="evaluation folder", hint=KNN_HINT)
        if not classes:
            raise DataError(f"evaluation folder '{root}' has no class sub-folders: {KNN_HINT}")
        super().__init__(files, labels, classes)
        self.root = Path(root)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, _ = self._load_or_next(index)
        return self.transform(image), label
