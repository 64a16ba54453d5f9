"""iBOT patch masks for the global crops: dinov2's block-wise masking, drawn per sample.

The block algorithm is dinov2's MaskingGenerator (itself BEiT's), draw for draw, but from an
explicit `random.Random` instead of the global `random` module, so a loader worker's other
random users cannot shift it.

Intentional difference from dinov2: its collate function masks int(batch * probability)
crops of the batch, gives them mask ratios stratified over the batch (linspace), and
shuffles: a crop's mask depends on the batch it lands in. Here every sample draws its own
masks from its own seed, so neither the world size, the accumulation nor the batch
composition changes any sample's masks (the number of masked crops per batch then varies
around probability * crops instead of being fixed).
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch

TRIES_PER_BLOCK = 10  # dinov2: a block gives up after 10 placements that add nothing


class BlockMaskGenerator:
    """Rectangles of patches, each of area ~ U(min_patches, max_patches) and log-uniform
    aspect ratio, until the requested number of patches is masked or a block adds nothing.

    `max_patches` defaults to half the grid, dinov2's training setting
    (max_num_patches = 0.5 * H * W).
    """

    def __init__(self, grid: int | tuple[int, int], max_patches: float | None = None,
                 min_patches: int = 4, min_aspect: float = 0.3,
                 max_aspect: float | None = None):
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.max_patches = 0.5 * self.height * self.width if max_patches is None else max_patches
        self.min_patches = min_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @property
    def n_patches(self) -> int:
        return self.height * self.width

    def _add_block(self, rng: random.Random, mask: np.ndarray, most: float) -> int:
        """Try up to 10 rectangles; apply the first that masks 1..`most` new patches."""
        for _ in range(TRIES_PER_BLOCK):
            area = rng.uniform(self.min_patches, most)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w >= self.width or h >= self.height:
                continue  # dinov2 draws no position for a block that does not fit
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            block = mask[top:top + h, left:left + w]
            added = h * w - int(block.sum())
            if 0 < added <= most:
                block[...] = True
                return added
        return 0

    def __call__(self, rng: random.Random, num_masking_patches: int) -> np.ndarray:
        """A bool mask [H, W] with at most `num_masking_patches` patches set."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        masked = 0
        while masked < num_masking_patches:
            most = min(num_masking_patches - masked, self.max_patches)
            added = self._add_block(rng, mask, most)
            if added == 0:
                break
            masked += added
        return mask


def draw_sample_masks(seed: int, n_global_crops: int, grid: int, probability: float,
                      ratio: tuple[float, float],
                      generator: BlockMaskGenerator) -> torch.Tensor:
    """The masks of one sample's global crops, BoolTensor [n_global_crops, grid * grid].

    From `random.Random(seed)`, crop after crop: masked with `probability`; a masked crop
    masks int(P * U(ratio)) patches (P = grid * grid) with the block generator.
    """
    if (generator.height, generator.width) != (grid, grid):
        raise ValueError(f"the mask generator's grid {generator.height}x{generator.width} "
                         f"is not the crop's {grid}x{grid}")
    rng = random.Random(seed)
    n_patches = grid * grid
    masks = np.zeros((n_global_crops, n_patches), dtype=bool)
    for crop in range(n_global_crops):
        if rng.random() < probability:
            wanted = int(n_patches * rng.uniform(*ratio))
            masks[crop] = generator(rng, wanted).reshape(-1)
    return torch.from_numpy(masks)


class MaskSampler:
    """seed -> the masks of one sample's global crops; plain attributes, so it pickles into
    DataLoader worker processes."""

    def __init__(self, n_global_crops: int, grid: int, probability: float,
                 ratio: tuple[float, float]):
        self.n_global_crops = n_global_crops
        self.grid = grid
        self.probability = probability
        self.ratio = tuple(ratio)
        self.generator = BlockMaskGenerator(grid)

    def __call__(self, seed: int) -> torch.Tensor:
        return draw_sample_masks(seed, self.n_global_crops, self.grid, self.probability,
                                 self.ratio, self.generator)
