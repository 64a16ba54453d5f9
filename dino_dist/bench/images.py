"""Photo-sized JPEG files for the data benchmark, made once into a cache folder.

The multi-crop pipeline's cost depends on the decoded size and on JPEG decoding, so the
benchmark needs files shaped like ImageNet's (about 500x375) rather than the demo's tiny PNGs.
Their content is smooth colour fields with noise, which JPEG compresses about as much as it
compresses photographs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from dino_dist.atomic_file import write_atomically

BENCH_IMAGE_SIZE = (500, 375)  # width, height: the most common ImageNet shape
JPEG_QUALITY = 90


def default_bench_image_dir() -> Path:
    cache = os.environ.get("DINO_DIST_CACHE") or Path.home() / ".cache" / "dino_dist"
    return Path(cache) / "bench_jpegs"


def _photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # A few low-frequency colour waves plus fine noise: gradients, edges and texture.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), dtype=np.float32)
    for channel in range(3):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
        image[..., channel] = 127 + 90 * np.sin(fx * xs + fy * ys + phase)
    image += rng.normal(0, 18, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def ensure_bench_images(folder: Path | None = None, count: int = 64, seed: int = 0) -> Path:
    """`count` JPEGs of BENCH_IMAGE_SIZE in `folder` (made if missing); returns the folder."""
    folder = Path(folder) if folder else default_bench_image_dir()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = BENCH_IMAGE_SIZE
    for index in range(count):
        path = folder / f"img_{index:04d}.jpg"
        pixels = _photo_like(rng, width, height)  # drawn even when the file exists: stable content
        if not path.exists():
            image = Image.fromarray(pixels)
            write_atomically(path, lambda f: image.save(f, format="JPEG", quality=JPEG_QUALITY))
    return folder
