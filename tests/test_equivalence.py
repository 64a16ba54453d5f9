"""Distributed and accumulation math: 2 ranks x B/2 and k micro-batches x B/k must equal
1 rank x B after several optimizer steps (student, teacher and center, fp32, 1e-5 relative).

These runs go through the real entry point: real PNG files, the real multi-crop pipeline,
real gloo process groups under torchrun. The last test repeats the comparisons with the fast
paths switched on (augmentation on the training device, packed crops, and steps whose figures
are read a step late because they neither log nor save).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import (EQUIVALENCE_SEED, max_relative_error, run_train, tiny_overrides,
                            write_image_folder)

STEPS = 6
BATCH = 8
# Why not seed 0: conftest.EQUIVALENCE_SEED (the fast paths' crops meet the same at block 2).
TRAINING = {"train.max_steps": STEPS, "train.seed": EQUIVALENCE_SEED}
FAST_PATHS = {"data.augment_on": "gpu", "model.packed_crops": True, "log.every_steps": 4}


def final_state(run_dir: Path) -> dict:
    path = run_dir / "checkpoints" / f"step_{STEPS:08d}.pt"
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("eq") / "images", classes=4, per_class=16)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref")
    run_train(tiny_overrides(dataset, out, **TRAINING))
    return final_state(out)


def assert_same_training(state: dict, ref: dict) -> None:
    assert state["step"] == ref["step"] == STEPS
    for part in ("student", "teacher", "loss"):
        err, key = max_relative_error(state[part], ref[part])
        assert err < 1e-5, f"{part}.{key} differs by {err:.2e} relative"


def test_reference_really_trains(reference, dataset, tmp_path):
    """Guard against a vacuous comparison: the weights and the center must have moved."""
    first = tmp_path / "one_step"
    run_train(tiny_overrides(dataset, first, **{**TRAINING, "train.max_steps": 1}))
    early = torch.load(first / "checkpoints" / f"step_{1:08d}.pt", weights_only=True)
    err, _ = max_relative_error(early["student"], reference["student"])
    assert err > 1e-3
    assert reference["loss"]["center"].abs().sum() > 0


def test_two_ranks_half_batch_equal_one_rank_full_batch(reference, dataset, tmp_path):
    run_train(tiny_overrides(dataset, tmp_path, **{
        **TRAINING, "optim.batch_size_per_gpu": BATCH // 2}), nproc=2)
    assert_same_training(final_state(tmp_path), reference)


def test_accumulation_equals_one_big_batch(reference, dataset, tmp_path):
    run_train(tiny_overrides(dataset, tmp_path, **{
        **TRAINING, "optim.batch_size_per_gpu": BATCH // 4,
        "optim.accum_steps": 4}))
    assert_same_training(final_state(tmp_path), reference)


def test_two_ranks_with_accumulation(reference, dataset, tmp_path):
    run_train(tiny_overrides(dataset, tmp_path, **{
        **TRAINING, "optim.batch_size_per_gpu": BATCH // 4,
        "optim.accum_steps": 2}), nproc=2)
    assert_same_training(final_state(tmp_path), reference)


def test_two_ranks_give_the_same_gradients_at_seed_0(dataset, tmp_path):
    """The default seed, checked before AdamW: after one step each parameter's first moment is
    (1 - beta1) x its clipped gradient, so 2 ranks x B/2 must match 1 x B there at 1e-5."""
    def first_moments(name: str, nproc: int, batch: int) -> dict:
        run_train(tiny_overrides(dataset, tmp_path / name, **{
            "train.max_steps": 1, "train.seed": 0, "optim.batch_size_per_gpu": batch}),
            nproc=nproc)
        state = torch.load(tmp_path / name / "checkpoints" / f"step_{1:08d}.pt",
                           weights_only=True)["optimizer"]["state"]
        return {str(index): moments["exp_avg"] for index, moments in state.items()}

    reference = first_moments("one_rank", 1, BATCH)
    assert sum(float(m.norm()) for m in reference.values()) > 1e-3
    err, index = max_relative_error(first_moments("two_ranks", 2, BATCH // 2), reference)
    assert err < 1e-5, f"parameter {index}'s gradient differs by {err:.2e} relative"


def test_tolerance_detects_a_small_change_in_the_math(reference, dataset, tmp_path):
    """The tolerance is strict enough to see a 1% change of the center momentum."""
    run_train(tiny_overrides(dataset, tmp_path, **{
        **TRAINING, "loss.center_momentum": 0.91}))
    err, _ = max_relative_error(final_state(tmp_path)["loss"], reference["loss"])
    assert err > 1e-4


def test_fast_paths_on_two_ranks_and_with_accumulation_equal_one_rank(dataset, tmp_path):
    runs = {"one_rank": ({"optim.batch_size_per_gpu": BATCH}, 1),
            "two_ranks": ({"optim.batch_size_per_gpu": BATCH // 2}, 2),
            "accumulation": ({"optim.batch_size_per_gpu": BATCH // 4, "optim.accum_steps": 4}, 1)}
    for name, (batch, nproc) in runs.items():
        run_train(tiny_overrides(dataset, tmp_path / name, **{
            **FAST_PATHS, **batch, **TRAINING}), nproc=nproc)
    reference = final_state(tmp_path / "one_rank")
    assert_same_training(final_state(tmp_path / "two_ranks"), reference)
    assert_same_training(final_state(tmp_path / "accumulation"), reference)
