"""iBOT block masks: dinov2's MaskingGenerator algorithm (facebookresearch/dinov2
dinov2/data/masking.py), re-stated here patch by patch on the global `random` module, against
ours on an explicit random.Random; and per-sample masks that depend on the seed alone.
"""
from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch

from dino_dist.data.masking import BlockMaskGenerator, MaskSampler, draw_sample_masks


class ReferenceMaskingGenerator:
    """dinov2's MaskingGenerator as it runs in training (max_num_patches = 0.5 * H * W),
    drawing from the global `random` module and masking patch by patch."""

    def __init__(self, height: int, width: int, min_patches: int = 4, min_aspect: float = 0.3):
        self.height, self.width = height, width
        self.min_patches = min_patches
        self.max_patches = 0.5 * height * width
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def one_block(self, mask: np.ndarray, most: float) -> int:
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_patches, most)
            aspect = math.exp(random.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                already = sum(int(mask[i, j]) for i in range(top, top + h)
                              for j in range(left, left + w))
                if 0 < h * w - already <= most:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
            if delta > 0:
                break
        return delta

    def __call__(self, wanted: int) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < wanted:
            delta = self.one_block(mask, min(wanted - count, self.max_patches))
            if delta == 0:
                break
            count += delta
        return mask


def reference_sample_masks(seed: int, crops: int, grid: int, probability: float,
                           ratio: tuple[float, float]) -> torch.Tensor:
    """The per-sample rule, on the global `random` module: crop by crop, masked with
    `probability`, then int(P * U(ratio)) patches by the block algorithm."""
    random.seed(seed)
    generator = ReferenceMaskingGenerator(grid, grid)
    masks = []
    for _ in range(crops):
        if random.random() < probability:
            masks.append(generator(int(grid * grid * random.uniform(*ratio))).reshape(-1))
        else:
            masks.append(np.zeros(grid * grid, dtype=bool))
    return torch.from_numpy(np.stack(masks))


@pytest.mark.parametrize("grid", [14, (10, 12)])
@pytest.mark.parametrize("wanted", [0, 5, 30, 90])
def test_block_masks_equal_the_official_algorithm_draw_for_draw(grid, wanted):
    height, width = (grid, grid) if isinstance(grid, int) else grid
    reference = ReferenceMaskingGenerator(height, width)
    ours = BlockMaskGenerator(grid)
    for seed in range(25):
        random.seed(seed)
        expected = reference(wanted)
        expected_next = random.random()  # both consumed the same number of draws
        rng = random.Random(seed)
        mask = ours(rng, wanted)
        assert mask.dtype == bool and mask.shape == (height, width)
        assert np.array_equal(mask, expected), f"seed {seed}"
        assert rng.random() == expected_next, f"seed {seed}"


def test_block_masks_stay_within_the_requested_count():
    generator = BlockMaskGenerator(14)
    for wanted in (0, 10, 50, 98):
        counts = [int(generator(random.Random(s), wanted).sum()) for s in range(40)]
        assert all(c <= wanted for c in counts)
        if wanted:
            # A block may fail to fit and stop it early, but rarely.
            assert sum(c == wanted for c in counts) >= 30, counts


def test_sample_masks_follow_the_per_sample_rule():
    generator = BlockMaskGenerator(14)
    for seed in range(30):
        ours = draw_sample_masks(seed, 2, 14, 0.5, (0.1, 0.5), generator)
        assert ours.dtype == torch.bool and ours.shape == (2, 196)
        assert torch.equal(ours, reference_sample_masks(seed, 2, 14, 0.5, (0.1, 0.5)))


def test_masked_crops_mask_within_the_ratio_and_probability_zero_masks_nothing():
    always = MaskSampler(n_global_crops=2, grid=14, probability=1.0, ratio=(0.1, 0.5))
    counts = torch.stack([always(seed).sum(dim=1) for seed in range(50)]).flatten()
    assert counts.max() <= int(196 * 0.5)
    assert (counts > 0).all()
    assert 0.1 * 196 <= counts.float().mean() <= 0.5 * 196
    never = MaskSampler(n_global_crops=2, grid=14, probability=0.0, ratio=(0.1, 0.5))
    assert not any(never(seed).any() for seed in range(50))


def test_some_crops_are_masked_at_probability_one_half():
    half = MaskSampler(n_global_crops=2, grid=14, probability=0.5, ratio=(0.1, 0.5))
    masked = torch.stack([half(seed).any(dim=1) for seed in range(100)]).float().mean()
    assert 0.35 <= masked <= 0.65


def test_same_seed_same_masks_and_different_seeds_differ():
    sampler = MaskSampler(n_global_crops=2, grid=14, probability=1.0, ratio=(0.1, 0.5))
    assert torch.equal(sampler(123), sampler(123))
    drawn = [sampler(seed) for seed in range(20)]
    assert all(not torch.equal(drawn[i], drawn[j]) for i in range(20) for j in range(i))


def test_a_samples_masks_depend_on_its_seed_alone():
    sampler = MaskSampler(n_global_crops=2, grid=14, probability=0.5, ratio=(0.1, 0.5))
    seeds = [2**62 + 7, 3, 991, 12345678901]
    alone = {seed: sampler(seed) for seed in seeds}
    # Another process's copy, other calls in between, in another order, with the global
    # random states moved: nothing but the seed may count.
    worker_copy = pickle.loads(pickle.dumps(sampler))
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    for seed in reversed(seeds):
        worker_copy(seed + 1)
        assert torch.equal(worker_copy(seed), alone[seed])


def test_a_generator_for_another_grid_is_refused():
    with pytest.raises(ValueError, match="grid"):
        draw_sample_masks(0, 2, 14, 0.5, (0.1, 0.5), BlockMaskGenerator(16))
