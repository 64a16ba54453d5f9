"""The demo recipe on real photographs: does it learn beyond the demo's shapes?

    pip install scikit-image           # its package ships a few real photographs
    python benchmarks/real_photos.py --out runs/real_photos [--seed 0] [key=value ...]

Builds a small labelled ImageFolder set from the photographs bundled with scikit-image (no
download): one class per photograph, 48 px patches cut at random positions and scales from
the photograph turned grey and each patch brought to the same mean and contrast (so neither
colour nor brightness alone tells the classes apart: what does is texture and structure),
training patches from its upper 60 % and validation patches from its lower 40 % (the two
never overlap). Then
trains `dino-train` with the demo's config on the training patches, with the k-NN at the
end on the two splits, and prints the teacher's and the random-init backbone's k-NN top-1 and
the health warnings of the run. Extra key=value arguments override the config.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from demo_sweep import read_run  # the same folder: one reader of a run's figures

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "brick",
          "grass", "gravel", "moon", "camera", "coins")
PATCH = 48
SHORT_SIDE = 256  # each photograph is resized to this short side before cutting patches
TRAIN_SHARE = 0.6
PER_CLASS = {"train": 200, "val": 50}
CONTRAST = 48.0  # the standard deviation of every patch's grey levels


def photograph(name: str) -> Image.Image:
    from skimage import data
    array = getattr(data, name)()
    image = Image.fromarray(array).convert("L")
    scale = SHORT_SIDE / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)),
                        Image.BICUBIC)


def cut_patches(image: Image.Image, split: str, count: int, rng: np.random.Generator):
    top, bottom = (0, TRAIN_SHARE) if split == "train" else (TRAIN_SHARE, 1.0)
    band_top, band_bottom = int(top * image.height), int(bottom * image.height)
    for _ in range(count):
        side = int(rng.integers(PATCH, min(2 * PATCH, band_bottom - band_top) + 1))
        x = int(rng.integers(0, image.width - side + 1))
        y = int(rng.integers(band_top, band_bottom - side + 1))
        patch = image.crop((x, y, x + side, y + side)).resize((PATCH, PATCH), Image.BICUBIC)
        yield Image.fromarray(same_mean_and_contrast(np.asarray(patch))).convert("RGB")


def same_mean_and_contrast(pixels: np.ndarray) -> np.ndarray:
    values = pixels.astype(np.float32)
    values = (values - values.mean()) / max(values.std(), 1.0) * CONTRAST + 128
    return np.clip(values + 0.5, 0, 255).astype(np.uint8)


def build(root: Path) -> Path:
    """The ImageFolder trees under root/train and root/val (made once, then reused)."""
    done = root / ".complete-v2"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for label, name in enumerate(PHOTOS):
        image = photograph(name)
        for split, count in PER_CLASS.items():
            folder = root / split / f"{label:02d}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for number, patch in enumerate(cut_patches(image, split, count, rng)):
                patch.save(folder / f"{number:04d}.png")
    done.touch()
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/real_photos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    out = Path(args.out)
    data = build(out / "photos")
    run_dir = out / f"run_seed{args.seed}"
    cmd = [sys.executable, "-m", "dino_dist.train", f"data.path={data / 'train'}",
           f"eval.train_path={data / 'train'}", f"eval.val_path={data / 'val'}",
           f"train.seed={args.seed}", f"train.output_dir={run_dir}", *args.overrides]
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        sys.exit(result.returncode)
    run = read_run(run_dir)
    print(f"real photos ({len(PHOTOS)} classes, {PER_CLASS['train']}/{PER_CLASS['val']} per "
          f"class): k-NN top-1 {run['knn']:.1f} % vs random init {run['random']:.1f} %; "
          f"teacher entropy {run['h_end']:.2f} ln K, {run['proto_end']} prototypes in use; "
          f"warnings: {run['warnings']}")


if __name__ == "__main__":
    main()
