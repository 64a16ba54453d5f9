"""FSDP2 sharding, sharded (DCP) checkpoints, export, compile and activation checkpointing.

Real torchrun/gloo processes on CPU, real PNG files, real checkpoint folders on disk.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_dist.export.backbone import export, sidecar
from dino_dist.models import build_backbone
from dino_dist.checkpoint.directory import COMMIT_MARKER as MARKER
from tests.conftest import (EQUIVALENCE_SEED, REPO, child_pids, free_port, kill_pids,
                            max_relative_error, run_train, state_at, subprocess_env,
                            tiny_overrides, write_image_folder)

STEPS = 6  # 64 images, 8 per optimizer step: 8 steps per epoch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("fsdp") / "images", classes=4, per_class=16)


def assert_close(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    for part in ("student", "teacher", "loss"):
        err, key = max_relative_error(a[part], b[part])
        assert err < tolerance, f"{part}.{key} differs by {err:.2e} relative"


@pytest.fixture(scope="module")
def ddp_reference(dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    run_train(tiny_overrides(dataset, out, **{"train.max_steps": STEPS,
                                              "optim.batch_size_per_gpu": 4}), nproc=2)
    return state_at(out, STEPS)


@pytest.fixture(scope="module")
def fsdp_run(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_run")
    run_train(tiny_overrides(dataset, out, **{
        "train.max_steps": STEPS, "optim.batch_size_per_gpu": 4, "train.parallel": "fsdp",
        "checkpoint.every_steps": 3}), nproc=2)
    return out


def test_fsdp_equals_ddp_on_two_ranks(fsdp_run, ddp_reference):
    state = state_at(fsdp_run, STEPS)
    assert (state["step"], state["world_size"]) == (STEPS, 2)
    assert sorted(p.name for p in (fsdp_run / "checkpoints" / f"step_{STEPS:08d}").iterdir()) \
        == [".metadata", MARKER, "__0_0.distcp", "__1_0.distcp", "state.pt"]
    assert_close(state, ddp_reference)


def test_fsdp_with_accumulation_equals_ddp(dataset, tmp_path, ddp_reference):
    run_train(tiny_overrides(dataset, tmp_path, **{
        "train.max_steps": STEPS, "optim.batch_size_per_gpu": 2, "optim.accum_steps": 2,
        "train.parallel": "fsdp"}), nproc=2)
    assert_close(state_at(tmp_path, STEPS), ddp_reference)


def test_fsdp_checkpoint_resumes_at_two_ranks_and_at_one(fsdp_run, dataset, tmp_path):
    """Step 3's folder (written by 2 ranks) continues on 2 ranks to the same step-6 state as
    the run that never stopped, and on 1 process with the epoch's samples carried over."""
    for name in ("two", "one"):
        shutil.copytree(fsdp_run / "checkpoints" / "step_00000003",
                        tmp_path / name / "checkpoints" / "step_00000003")
    common = {"train.parallel": "fsdp", "train.max_steps": STEPS}
    two = run_train(tiny_overrides(dataset, tmp_path / "two", **common,
                                   **{"optim.batch_size_per_gpu": 4}), nproc=2)
    assert "resumed from" in two.stdout and "step_00000003" in two.stdout
    assert_close(state_at(tmp_path / "two", STEPS), state_at(fsdp_run, STEPS), 1e-6)
    one = run_train(tiny_overrides(dataset, tmp_path / "one", **common,
                                   **{"optim.batch_size_per_gpu": 4}))
    assert "total batch 8 -> 4" in one.stdout and "first 24 samples" in one.stdout
    rows = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in l]
    assert [(r["step"], r["epoch_samples"]) for r in rows] == [(4, 28), (5, 32), (6, 36)]
    assert state_at(tmp_path / "one", STEPS)["world_size"] == 1


FAST_PATHS = {"data.augment_on": "gpu", "model.packed_crops": True, "log.every_steps": 4,
              "train.seed": EQUIVALENCE_SEED}


def test_fast_paths_fsdp_equals_ddp_and_resumes_exactly(dataset, tmp_path):
    """Crops made on the device, packed crops and late-read ordinary steps: FSDP equals DDP,
    and a resume from step 3 reaches the uninterrupted step-6 state."""
    common = {**FAST_PATHS, "train.max_steps": STEPS, "optim.batch_size_per_gpu": 4}
    run_train(tiny_overrides(dataset, tmp_path / "ddp", **common), nproc=2)
    run_train(tiny_overrides(dataset, tmp_path / "fsdp", **common, **{
        "train.parallel": "fsdp", "checkpoint.every_steps": 3}), nproc=2)
    assert_close(state_at(tmp_path / "fsdp", STEPS), state_at(tmp_path / "ddp", STEPS))
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step_00000003",
                    tmp_path / "resumed" / "checkpoints" / "step_00000003")
    resumed = run_train(tiny_overrides(dataset, tmp_path / "resumed", **common,
                                       **{"train.parallel": "fsdp"}), nproc=2)
    assert "resumed from" in resumed.stdout
    assert_close(state_at(tmp_path / "resumed", STEPS), state_at(tmp_path / "fsdp", STEPS), 1e-6)


def test_folder_without_commit_marker_is_skipped_with_a_warning(fsdp_run, dataset, tmp_path):
    shutil.copytree(fsdp_run / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / f"step_{STEPS:08d}" / MARKER).unlink()  # as if killed
    result = run_train(tiny_overrides(dataset, tmp_path, **{
        "train.parallel": "fsdp", "train.max_steps": STEPS + 1}))
    assert f"step_{STEPS:08d}: a save that was interrupted before it was committed" in result.stdout
    assert "resumed from" in result.stdout and "step_00000003 (step 3" in result.stdout


def test_sigkill_during_fsdp_saves_never_prevents_resuming(dataset, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(dataset, out, **{
        "train.parallel": "fsdp", "train.epochs": 2, "optim.batch_size_per_gpu": 4,
        "checkpoint.every_steps": 1, "checkpoint.keep_last": 2})
    env = {**subprocess_env(), "DINO_DIST_TEST_SAVE_DELAY_S": "0.4"}
    kills = 0
    for attempt in range(4):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "dino_dist.train", *args]
        agent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        if kills < 1:  # kill while a checkpoint folder is being written (no marker yet)
            deadline = time.monotonic() + 120
            while agent.poll() is None and time.monotonic() < deadline:
                folders = [p for p in (out / "checkpoints").glob("step_*") if p.is_dir()] \
                    if (out / "checkpoints").is_dir() else []
                if any(not (p / MARKER).exists() for p in folders):
                    kill_pids([*child_pids(agent.pid), agent.pid])  # agent and both workers
                    kills += 1
                    break
                time.sleep(0.02)
        _, stderr = agent.communicate(timeout=240)
        if agent.returncode == 0:
            break
    assert agent.returncode == 0, stderr[-3000:]
    assert kills == 1
    assert state_at(out, 16)["step"] == 16


def test_export_of_ddp_and_fsdp_checkpoints_is_identical(dataset, tmp_path):
    """One process: DDP and FSDP train the same model; their exports must match exactly."""
    for kind in ("ddp", "fsdp"):
        run_train(tiny_overrides(dataset, tmp_path / kind, **{
            "train.max_steps": 3, "train.parallel": kind}))
    fsdp_out, ddp_out = tmp_path / "fsdp.pth", tmp_path / "ddp.pth"
    result = subprocess.run([sys.executable, "-m", "dino_dist.cli.export",
                             str(tmp_path / "fsdp" / "checkpoints" / "step_00000003"),
                             "--output", str(fsdp_out)], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"wrote {fsdp_out}: teacher backbone of step 3 (vit_mini" in result.stdout
    export(tmp_path / "ddp" / "checkpoints" / "step_00000003.pt", ddp_out)
    fsdp_weights, ddp_weights = (torch.load(p, weights_only=True) for p in (fsdp_out, ddp_out))
    assert ddp_weights.keys() == fsdp_weights.keys()
    assert all(torch.equal(ddp_weights[k], fsdp_weights[k]) for k in ddp_weights)
    info = json.loads(sidecar(fsdp_out).read_text())
    backbone = build_backbone(info["arch"], info["patch_size"], 0.0, info["img_size"])
    backbone.load_state_dict(fsdp_weights, strict=True)
    assert "cls_token" in fsdp_weights and "blocks.0.attn.qkv.weight" in fsdp_weights
    # dino-knn takes the exported file as it is.
    knn = subprocess.run([sys.executable, "-m", "dino_dist.cli.knn", "--checkpoint",
                          str(fsdp_out), "--train-data", str(dataset), "--val-data",
                          str(dataset), "--device", "cpu"], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert knn.returncode == 0 and "top-1" in knn.stdout, knn.stderr


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in l]


def test_compile_with_activation_checkpointing_gives_the_eager_loss(dataset, tmp_path):
    """Both block options at once (the order they are applied in is part of what is tested)."""
    if not shutil.which("g++"):
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++), and none is installed")
    small = {"train.max_steps": 2, "data.local_crops_number": 0}  # one shape: one compilation
    run_train(tiny_overrides(dataset, tmp_path / "eager", **small))
    run_train(tiny_overrides(dataset, tmp_path / "options", **small, **{
        "train.compile": True, "train.activation_checkpointing": True}), timeout=500)
    eager, other = losses(tmp_path / "eager"), losses(tmp_path / "options")
    assert len(eager) == len(other) == 2
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(eager, other)), (eager, other)


def test_async_saves_commit_and_resume_to_the_same_state(fsdp_run, dataset, tmp_path):
    """Background writes: each folder gets its marker, and resuming from the last one gives
    the state of the run that saved synchronously and never stopped."""
    common = {"train.parallel": "fsdp", "optim.batch_size_per_gpu": 4,
              "checkpoint.async_save": True, "checkpoint.every_steps": 2}
    first = run_train(tiny_overrides(dataset, tmp_path, **common, **{"train.max_steps": 4}),
                      nproc=2)
    assert "(writing in the background)" in first.stdout
    folders = sorted(p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["step_00000002", "step_00000004"]
    assert all((p / MARKER).is_file() for p in folders)
    second = run_train(tiny_overrides(dataset, tmp_path, **common, **{"train.max_steps": STEPS}),
                       nproc=2)
    assert "step_00000004 (step 4" in second.stdout
    assert_close(state_at(tmp_path, STEPS), state_at(fsdp_run, STEPS), 1e-6)
