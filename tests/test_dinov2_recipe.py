"""The DINOv2 recipe keeps every guarantee of the DINO one: with Sinkhorn-Knopp targets, the
KoLeo term over the whole step, the iBOT masked-patch term, LayerScale, registers and
layer-wise learning rates all on, 2 ranks x B/2, k micro-batches x B/k and FSDP give the
training of 1 rank x B, and a run SIGKILLed mid-epoch resumes exactly.

Real entry point, real PNG files, real gloo process groups under torchrun (as
test_equivalence.py for the DINO recipe).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import max_relative_error, run_train, state_at, tiny_overrides, write_image_folder
from tests.test_shard_training import run_until_killed

STEPS = 6
BATCH = 8
DINOV2 = {"loss.centering": "sinkhorn_knopp", "loss.koleo_weight": 0.1, "ibot.weight": 1.0,
          "model.layerscale": 0.1, "model.num_registers": 2, "optim.layerwise_decay": 0.9,
          "optim.patch_embed_lr_mult": 0.2, "train.max_steps": STEPS}
PARTS = ("student", "teacher", "loss", "patch_center")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("v2") / "images", classes=4, per_class=16)


def train(dataset: Path, out: Path, nproc: int = 1, **extra) -> dict:
    run_train(tiny_overrides(dataset, out, **{**DINOV2, **extra}), nproc=nproc)
    return state_at(out, STEPS)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("v2_ref")
    return train(dataset, out, **{"optim.batch_size_per_gpu": BATCH}), out


def assert_same_training(state: dict, ref: dict, tolerance: float = 1e-5) -> None:
    assert state["step"] == ref["step"] == STEPS
    for part in PARTS:
        err, key = max_relative_error(state[part], ref[part])
        assert err < tolerance, f"{part}.{key} differs by {err:.2e} relative"


def test_every_dinov2_part_is_on_and_trains(reference, dataset, tmp_path):
    """Guard against vacuous comparisons: each term is logged, the DINOv2 parameters and the
    patch center moved, and the run differs from the DINO recipe on the same images."""
    state, out = reference
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for name in ("loss_dino", "loss_koleo", "loss_ibot", "patch_entropy_ratio",
                 "patch_prototypes_used"):
        assert name in last, name
    assert last["loss"] == pytest.approx(
        last["loss_dino"] + 0.1 * last["loss_koleo"] + last["loss_ibot"], rel=1e-4)
    student = state["student"]
    assert student["backbone.mask_token"].abs().sum() > 0  # trained only through iBOT
    assert student["backbone.register_tokens"].std() > 1e-4  # moved from their 1e-6 init
    assert student["backbone.blocks.0.ls1.gamma"].sub(0.1).abs().max() > 1e-5
    assert state["patch_center"]["center"].abs().sum() > 0
    dino = tmp_path / "dino"
    run_train(tiny_overrides(dataset, dino, **{"train.max_steps": STEPS}))
    plain = state_at(dino, STEPS)
    err, _ = max_relative_error(plain["teacher"], {k: v for k, v in state["teacher"].items()
                                                   if k in plain["teacher"]})
    assert err > 1e-3


def test_two_ranks_half_batch_equal_one_rank_full_batch(reference, dataset, tmp_path):
    state = train(dataset, tmp_path, nproc=2, **{"optim.batch_size_per_gpu": BATCH // 2})
    assert_same_training(state, reference[0])


def test_accumulation_equals_one_big_batch(reference, dataset, tmp_path):
    """Sinkhorn-Knopp over the whole step and the KoLeo look-ahead make 4 x B/4 exact."""
    state = train(dataset, tmp_path, **{"optim.batch_size_per_gpu": BATCH // 4,
                                        "optim.accum_steps": 4})
    assert_same_training(state, reference[0])


def test_two_ranks_with_accumulation_and_packed_crops(reference, dataset, tmp_path):
    state = train(dataset, tmp_path, nproc=2, **{"optim.batch_size_per_gpu": BATCH // 4,
                                                 "optim.accum_steps": 2,
                                                 "model.packed_crops": True})
    assert_same_training(state, reference[0])


def test_fsdp_with_accumulation_equals_one_rank(reference, dataset, tmp_path):
    """Sharded, with the KoLeo look-ahead (a forward without gradients) between the teacher
    passes and the student passes of each step."""
    state = train(dataset, tmp_path, nproc=2, **{"optim.batch_size_per_gpu": BATCH // 4,
                                                 "optim.accum_steps": 2,
                                                 "train.parallel": "fsdp"})
    assert_same_training(state, reference[0])


def test_per_rank_koleo_changes_with_the_world_size(reference, dataset, tmp_path):
    """DINOv2's own KoLeo form (per rank) trains otherwise on 2 ranks than on 1 (where it is
    the global form: one rank holds the whole batch): what the global form exists to avoid,
    and a check that the comparisons above can fail."""
    two = train(dataset, tmp_path, nproc=2, **{"optim.batch_size_per_gpu": BATCH // 2,
                                               "loss.koleo_scope": "per_rank"})
    err, _ = max_relative_error(two["student"], reference[0]["student"])
    assert err > 1e-4


def test_sigkill_mid_epoch_then_resume_equals_an_unbroken_run(dataset, tmp_path):
    """Stochastic depth on and 2 micro-batches a step: the KoLeo look-ahead replays the random
    draws, and a resumed run draws what the unbroken one did."""
    extra = {"optim.batch_size_per_gpu": BATCH // 2, "optim.accum_steps": 2,
             "model.drop_path_rate": 0.1, "checkpoint.every_steps": 1}
    unbroken = train(dataset, tmp_path / "unbroken", **extra)
    run_dir = tmp_path / "killed"
    run_until_killed(tiny_overrides(dataset, run_dir, **{**DINOV2, **extra}), 1,
                     {"DINO_DIST_TEST_STEP_DELAY_S": "1"}, run_dir / "checkpoints",
                     kill_after=2)
    resumed = train(dataset, run_dir, **extra)
    for part in PARTS:
        for key, value in unbroken[part].items():
            assert torch.equal(resumed[part][key], value), f"{part}.{key}"


# -- the shipped config, as a user runs it ---------------------------------------------------

SHRINK = ["model.arch=vit_mini", "model.img_size=28", "data.global_crop_size=28",
          "data.local_crop_size=14", "data.local_crops_number=2", "model.out_dim=256",
          "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "data.num_workers=0",
          "optim.batch_size_per_gpu=4", "train.device=cpu", "log.every_steps=1",
          "eval.image_size=28"]


@pytest.mark.parametrize("config", ["configs/dinov2_vit_small_14.yaml",
                                    "configs/dinov2_vit_large_14.yaml"])
def test_dinov2_config_trains_resumes_in_the_frozen_epoch_and_reports_knn(config, dataset, tmp_path):
    """Each shipped DINOv2 config with only its sizes shrunk: bf16, stochastic depth, the
    last layer frozen in epoch 1, 2 ranks (ViT-L/14's: FSDP, SwiGLU, its own iBOT head), k-NN
    at the end; a run stopped inside the first epoch resumes to the uninterrupted run's
    weights, and the run exits 0."""
    stop, end = 3, 10  # 8 steps an epoch here
    own_head = ["ibot.out_dim=128"] if "large" in config else []  # the config's 131,072, shrunk
    user = SHRINK + own_head + [f"data.path={dataset}", "eval.knn_at_end=true", f"eval.train_path={dataset}",
                     f"eval.val_path={dataset}", "checkpoint.every_steps=1", "checkpoint.keep_last=20"]
    whole = run_train(user + [f"train.output_dir={tmp_path / 'whole'}", f"train.max_steps={end}"],
                      nproc=2, config=config, timeout=400)
    assert "k-NN (k=20)" in whole.stdout and "random init" in whole.stdout
    frozen = state_at(tmp_path / "whole", stop)
    first = state_at(tmp_path / "whole", 1)
    last_layer = [k for k in frozen["student"] if k.startswith("head.last_layer")]
    assert last_layer and all(torch.equal(frozen["student"][k], first["student"][k]) for k in last_layer)
    assert any(not torch.equal(state_at(tmp_path / "whole", end)["student"][k], frozen["student"][k])
               for k in last_layer)  # trained once the first epoch is over
    run_train(user + [f"train.output_dir={tmp_path / 'stopped'}", f"train.max_steps={stop}"],
              nproc=2, config=config, timeout=400)
    resumed = run_train(user + [f"train.output_dir={tmp_path / 'stopped'}", f"train.max_steps={end}"],
                        nproc=2, config=config, timeout=400)
    assert "resumed from" in resumed.stdout
    ours, reference = state_at(tmp_path / "stopped", end), state_at(tmp_path / "whole", end)
    for part in PARTS:
        err, key = max_relative_error(ours[part], reference[part])
        assert err < 1e-6, f"{part}.{key} differs by {err:.2e} relative"
