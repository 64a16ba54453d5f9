"""A small built-in image dataset so training runs with no download.

Ten shape/pattern classes drawn at random position, scale and rotation, a light shape on a
dark ground in the same two grey levels for every image, so only shape tells classes (and
images) apart.

Version 2 also drew each image's polarity (light on dark or dark on light). Two crops of one
image share it and no DINO augmentation inverts an image, so polarity was the cheapest cue
two views agree on: the features split the data by polarity first and learned shape slowly
(benchmarks/demo_sweep.py, the `landed` rows). Version 3 keeps the shapes of version 2 and
draws them in one polarity; `ensure_demo_dataset(version=2)` still makes the old set.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

GENERATOR_VERSION = 3
GENERATOR_VERSIONS = (2, 3)
IMAGE_SIZE = 48
SUPERSAMPLE = 2  # shapes are drawn at 2x and averaged down, which anti-aliases edges
PER_CLASS_TRAIN = 260
PER_CLASS_VAL = 60
DARK_LEVEL, LIGHT_LEVEL, NOISE_STD = 0.15, 0.85, 0.03
SPLIT_IDS = {"train": 0, "val": 1}

Mask = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def default_demo_dir() -> Path:
    cache = os.environ.get("DINO_DIST_CACHE")
    return Path(cache) / "demo" if cache else Path.home() / ".cache" / "dino_dist" / "demo"


# Each mask takes shape-local coordinates (u, v), where the shape spans roughly
# the unit disc, and returns a boolean foreground mask.

def _circle(u, v, rng):
    return u**2 + v**2 <= 1.0


def _ring(u, v, rng):
    radius = np.sqrt(u**2 + v**2)
    return (radius <= 1.0) & (radius >= rng.uniform(0.5, 0.7))


def _square_outline(u, v, rng):
    box = np.maximum(np.abs(u), np.abs(v))
    return (box <= 0.85) & (box >= 0.85 - rng.uniform(0.22, 0.35))


def _triangle(u, v, rng):
    # Equilateral triangle inscribed in the unit circle: three half-planes.
    inside = np.ones_like(u, dtype=bool)
    for angle in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        inside &= u * np.cos(angle) + v * np.sin(angle) >= -0.5
    return inside


def _cross(u, v, rng):
    arm = rng.uniform(0.2, 0.3)
    return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))


def _patch(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.9


def _stripes(u, v, rng):
    period = rng.uniform(0.4, 0.55)
    return _patch(u, v) & (np.mod(v, period) < period / 2)


def _checkerboard(u, v, rng):
    cells = rng.uniform(0.4, 0.55)
    parity = np.floor(u / cells) + np.floor(v / cells)
    return _patch(u, v) & (np.mod(parity, 2) == 0)


def _dots(u, v, rng):
    spacing = rng.uniform(0.45, 0.6)
    du = np.mod(u, spacing) - spacing / 2
    dv = np.mod(v, spacing) - spacing / 2
    return _patch(u, v) & (du**2 + dv**2 <= (0.3 * spacing) ** 2)


def _star(u, v, rng):
    # Five-pointed star: within each tenth of a turn the edge is the straight line
    # from a tip (radius 1, angle 0) to a valley (radius `inner`, angle pi/5).
    inner, half_sector = 0.42, np.pi / 5
    angle = np.mod(np.arctan2(v, u), 2 * half_sector)
    angle = np.minimum(angle, 2 * half_sector - angle)
    edge = inner * np.sin(half_sector) / (
        inner * np.sin(half_sector) * np.cos(angle) - np.sin(angle) * (inner * np.cos(half_sector) - 1)
    )
    return np.sqrt(u**2 + v**2) <= edge


def _any_angle(rng):
    return rng.uniform(0, 2 * np.pi)


def _near_horizontal(rng):
    return rng.uniform(-np.pi / 12, np.pi / 12)


def _near_diagonal(rng):
    # Either diagonal: a horizontal flip turns one into the other anyway.
    return rng.choice([np.pi / 4, 3 * np.pi / 4]) + rng.uniform(-np.pi / 12, np.pi / 12)


# Stripe classes keep their orientation (it is what separates them); the rest
# are rotated freely.
CLASSES: list[tuple[str, Mask, Callable]] = [
    ("circle", _circle, _any_angle),
    ("ring", _ring, _any_angle),
    ("square_outline", _square_outline, _any_angle),
    ("triangle", _triangle, _any_angle),
    ("cross", _cross, _any_angle),
    ("horizontal_stripes", _stripes, _near_horizontal),
    ("diagonal_stripes", _stripes, _near_diagonal),
    ("checkerboard", _checkerboard, _any_angle),
    ("dots_grid", _dots, _any_angle),
    ("star", _star, _any_angle),
]
CLASS_FOLDERS = [f"{label:02d}_{name}" for label, (name, _, _) in enumerate(CLASSES)]


def _shape_alpha(rng: np.random.Generator, mask: Mask, angle: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a randomly placed, scaled and rotated shape."""
    fine = IMAGE_SIZE * SUPERSAMPLE
    centre_x, centre_y = rng.uniform(0.3, 0.7, 2) * IMAGE_SIZE
    radius = rng.uniform(0.22, 0.4) * IMAGE_SIZE
    pixels = (np.arange(fine) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid((pixels - centre_x) / radius, (pixels - centre_y) / radius)
    cos, sin = np.cos(angle), np.sin(angle)
    covered = mask(cos * x + sin * y, -sin * x + cos * y, rng).astype(np.float32)
    return covered.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def render_image(rng: np.random.Generator, label: int,
                 version: int = GENERATOR_VERSION) -> np.ndarray:
    """One HxWx3 uint8 image of class `label`: a light shape on dark ground (version 2: or
    the reverse, drawn at random).

    The two grey levels are the same for every image, so no colour cue tells one image from
    another: what two crops of an image share is its shape. Self-supervision then has to learn shape, which is also what a
    randomly initialised network does not capture -- the gap k-NN measures.
    """
    _, mask, draw_angle = CLASSES[label]
    dark, light = DARK_LEVEL, LIGHT_LEVEL
    dark_ground = rng.random() < 0.5  # drawn in every version: the same shapes in each
    background, foreground = (dark, light) if dark_ground or version >= 3 else (light, dark)
    alpha = _shape_alpha(rng, mask, draw_angle(rng))[..., None]
    noise = rng.normal(0, NOISE_STD, (IMAGE_SIZE, IMAGE_SIZE, 3))
    image = background * (1 - alpha) + foreground * alpha + noise
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


class _ProgressBar:
    """A one-line progress bar on stderr, redrawn only when the shown percentage changes."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.done = 0
        self.shown_percent = -1

    def advance(self) -> None:
        self.done += 1
        percent = 100 * self.done // self.total
        if not self.enabled or percent == self.shown_percent:
            return
        self.shown_percent = percent
        filled = percent * 30 // 100
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {percent:3d}%")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _generate(target: Path, per_split: dict[str, int], progress: bool,
              version: int = GENERATOR_VERSION) -> None:
    total = len(CLASSES) * sum(per_split.values())
    bar = _ProgressBar(total, f"generating demo images in {target.parent}", progress)
    for split, per_class in per_split.items():
        for label, folder in enumerate(CLASS_FOLDERS):
            class_dir = target / split / folder
            class_dir.mkdir(parents=True)
            for number in range(per_class):
                # Seeded per image: the content does not depend on generation order.
                # Version 2's seeds in every version, so version 3 draws the same shapes.
                rng = np.random.default_rng([2, SPLIT_IDS[split], label, number])
                Image.fromarray(render_image(rng, label, version)).save(class_dir / f"{number:04d}.png")
                bar.advance()


def ensure_demo_dataset(
    root: str | Path | None = None,
    progress: bool = True,
    *,
    per_class_train: int = PER_CLASS_TRAIN,
    per_class_val: int = PER_CLASS_VAL,
    version: int = GENERATOR_VERSION,
) -> Path:
    """Return a folder holding `train/` and `val/` ImageFolder trees, generating it once.

    The generator version and the counts are part of the folder name, so a
    changed generator or a different size never reuses old images.
    """
    if per_class_train < 1 or per_class_val < 1:
        raise ValueError(f"per_class_train and per_class_val must be positive, got {per_class_train}, {per_class_val}")
    if version not in GENERATOR_VERSIONS:
        raise ValueError(f"demo generator version {version} does not exist: {GENERATOR_VERSIONS}")
    root = Path(root).expanduser() if root else default_demo_dir()
    final = root / f"demo-v{version}-train{per_class_train}-val{per_class_val}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Built under a private hidden name and renamed into place only when complete:
    # an interrupted run leaves only the hidden folder, which is never used.
    temporary = root / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    if temporary.exists():
        # Same host and pid as us: left by a dead process whose pid we inherited.
        shutil.rmtree(temporary)
    _generate(temporary, {"train": per_class_train, "val": per_class_val}, progress, version)
    try:
        os.rename(temporary, final)
    except OSError:
        # Another process (e.g. a rank on the same node) finished first; use its copy.
        if not final.is_dir():
            raise
        shutil.rmtree(temporary, ignore_errors=True)
    return final
