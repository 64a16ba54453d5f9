"""Write N synthetic JPEG photos-sized images (random smooth colour fields) for throughput runs.

    python benchmarks/make_images.py OUT_DIR --count 2048 --size 320 --workers 8
"""
from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def write_one(args: tuple[Path, int, int]) -> None:
    folder, index, size = args
    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size * 4 // 3, size), Image.BICUBIC)
    noise = rng.integers(0, 24, size=(size, size * 4 // 3, 3), dtype=np.uint8)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / f"img_{index:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=2048)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(args.out, i, args.size) for i in range(args.count)]
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(write_one, jobs, chunksize=64))
    print(f"wrote {args.count} images to {args.out}")


if __name__ == "__main__":
    main()
