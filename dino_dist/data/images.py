"""Decoding images and the policy for bad ones, shared by folders and shard sets.

An ImageSet is anything that holds images by position: a folder (folder.py) or a shard set
(shard_images.py). Whatever the source, a bad image is skipped the same way: the next
position is taken instead (deterministic, so every rank and every resume agrees), the skip is
counted, and the image is named once in a warning.
"""
from __future__ import annotations

import abc
import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from dino_dist.errors import DataError

MAX_CONSECUTIVE_BAD_IMAGES = 50

# Decoders signal a bad file with any of these; anything else is a real bug.
DECODE_ERRORS = (OSError, RuntimeError, ValueError, Image.DecompressionBombError)


def decode_bytes(data: bytes) -> torch.Tensor:
    """Decode an encoded image to a uint8 RGB CHW tensor, via PIL if torchvision cannot."""
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except DECODE_ERRORS:
        # torchvision decodes jpeg/png/webp/gif; bmp, tiff and ppm go through PIL.
        with Image.open(io.BytesIO(data)) as pil_image:
            array = np.asarray(pil_image.convert("RGB"))
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    # 16-bit PNGs decode to uint16; the augmentations expect uint8.
    return image if image.dtype == torch.uint8 else TF.to_dtype(image, torch.uint8, scale=True)


class ImageSet(abc.ABC):
    """Images by position, with the skip-bad-images policy. Subclasses say how to decode,
    label and name position i, and what identifies their contents (for feature caches)."""

    classes: list[str]

    def __init__(self) -> None:
        # Per process (each DataLoader worker has its own copy): warn once per image.
        self._warned: set[str] = set()

    @abc.abstractmethod
    def __len__(self) -> int:
        ...

    @abc.abstractmethod
    def decode(self, position: int) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def label(self, position: int) -> int:
        ...

    @abc.abstractmethod
    def name(self, position: int) -> str:
        ...

    @property
    @abc.abstractmethod
    def identity(self) -> object:
        """JSON-able, and different whenever the images or their order differ."""
        ...

    def prefetch(self, positions: Sequence[int]) -> None:
        """A hint: these positions are read next (a remote source fetches them together)."""

    def load_or_next(self, position: int) -> tuple[torch.Tensor, int, int]:
        """Decode `position`; on a bad image move on to the next position.

        Returns (image, label, number of bad images skipped).
        """
        attempts = min(MAX_CONSECUTIVE_BAD_IMAGES, len(self))
        for skipped in range(attempts):
            current = (position + skipped) % len(self)
            try:
                return self.decode(current), self.label(current), skipped
            except DataError:
                raise  # the storage failed (a ValueError too): not a bad image to skip
            except DECODE_ERRORS as error:
                self._warn_bad_image(self.name(current), error)
        raise DataError(
            f"{attempts} consecutive images from '{self.name(position)}' on could not be decoded: "
            "check that the data holds valid image files"
        )

    def _warn_bad_image(self, name: str, error: Exception) -> None:
        if name in self._warned:
            return
        self._warned.add(name)
        warnings.warn(f"skipping unreadable image '{name}' ({type(error).__name__}: {error})", stacklevel=3)
