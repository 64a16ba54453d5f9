"""Image datasets read from a folder: an ImageFolder tree or a plain folder of images."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dino_dist.errors import DataError

from .images import ImageSet, decode_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
PATH_HINT = "set data.path to an ImageFolder root, a folder of images, a shard set, or 'demo'"
KNN_HINT = ("evaluation needs labelled images: an ImageFolder tree with one sub-folder per class, "
            "or shards written by dino-shard from one")


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
    """Decode an image file to a uint8 RGB CHW tensor."""
    with open(path, "rb") as handle:
        return decode_bytes(handle.read())


class FolderImages(ImageSet):
    """The images of an ImageFolder tree or a plain folder (label -1, no classes)."""

    def __init__(self, root: str | Path, what: str = "data.path", hint: str = PATH_HINT) -> None:
        super().__init__()
        self.root = Path(root)
        self.files, self.labels, self.classes = find_images(root, what, hint)

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, position: int) -> torch.Tensor:
        return decode_rgb(self.files[position])

    def label(self, position: int) -> int:
        return self.labels[position]

    def name(self, position: int) -> str:
        return self.files[position]

    @property
    def identity(self) -> list[str]:
        return self.files
