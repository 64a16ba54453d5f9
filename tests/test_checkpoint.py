"""Checkpoint files: manifests, fallback past damaged files, retention, exact continuation."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from dino_dist.checkpoint.directory import list_checkpoints, manifest_path, prune_checkpoints
from dino_dist.checkpoint.reader import load_checkpoint, load_newest_valid
from dino_dist.checkpoint.single_file import save_file
from dino_dist.errors import CheckpointError
from tests.conftest import run_train, tiny_overrides


def fake_state(step: int, epoch: int = 0, epoch_step: int = 1) -> dict:
    return {"student": {"w": torch.full((4,), float(step))}, "teacher": {}, "optimizer": {},
            "loss": {}, "step": step, "epoch": epoch, "epoch_step": epoch_step, "config": {}}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "zero_bytes", "garbage", "no_manifest"])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage, caplog):
    for step in (1, 2):
        save_file(tmp_path, fake_state(step), is_main=True)
    newest = tmp_path / "step_00000002.pt"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "zero_bytes":
        newest.write_bytes(b"")
    elif damage == "garbage":
        newest.write_bytes(bytes(reversed(data)))
    else:
        manifest_path(newest).unlink()
    path, state = load_newest_valid(tmp_path)
    assert path.name == "step_00000001.pt" and state["step"] == 1
    assert "step_00000002.pt" in caplog.text


def test_manifest_describes_the_file(tmp_path):
    path = save_file(tmp_path, fake_state(7, epoch=2, epoch_step=0), is_main=True)
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest == {"format_version": 1, "step": 7, "epoch": 2, "epoch_step": 0,
                        "size": path.stat().st_size, "sha256": digest(path)}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert load_checkpoint(path)["step"] == 7
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_retention_keeps_newest_and_epoch_keepers(tmp_path):
    # epoch-end saves (epoch_step 0) at epochs 1..4, mid-epoch saves in between
    for step, epoch, epoch_step in [(5, 1, 0), (7, 1, 2), (10, 2, 0), (12, 2, 2), (15, 3, 0),
                                    (17, 3, 2), (20, 4, 0)]:
        save_file(tmp_path, fake_state(step, epoch, epoch_step), is_main=True)
        prune_checkpoints(tmp_path, keep_last=2, keep_every_epochs=2)
    kept = sorted(p.name for p in list_checkpoints(tmp_path))
    assert kept == ["step_00000010.pt", "step_00000017.pt", "step_00000020.pt"]
    assert all(manifest_path(tmp_path / name).exists() for name in kept)
    assert len(list(tmp_path.glob("*.manifest.json"))) == 3


def test_fresh_start_refuses_to_overwrite_checkpoints(tmp_path, image_folder):
    run_train(tiny_overrides(image_folder, tmp_path, **{"train.max_steps": 2}))
    ckpt = tmp_path / "checkpoints" / "step_00000002.pt"
    before = digest(ckpt)
    result = run_train(tiny_overrides(image_folder, tmp_path, **{
        "train.max_steps": 3, "checkpoint.resume": False}), check=False)
    assert result.returncode != 0
    assert "checkpoint.resume=false but" in result.stderr + result.stdout
    assert digest(ckpt) == before and not (tmp_path / "checkpoints" / "step_00000003.pt").exists()


def resumed_equals_uninterrupted(tmp_path, image_folder, nproc: int) -> None:
    extra = {"model.drop_path_rate": 0.1, "train.epochs": 2, "optim.batch_size_per_gpu": 8 // nproc}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(tiny_overrides(image_folder, straight, **extra), nproc=nproc)
    run_train(tiny_overrides(image_folder, resumed, **extra, **{"train.max_steps": 3}), nproc=nproc)
    result = run_train(tiny_overrides(image_folder, resumed, **extra), nproc=nproc)
    assert "resumed from" in result.stdout and "step_00000003.pt" in result.stdout
    a = torch.load(straight / "checkpoints" / "step_00000008.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step_00000008.pt", weights_only=True)
    for part in ("student", "teacher", "loss"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


def test_resume_mid_epoch_is_bit_exact(tmp_path, image_folder):
    """Stochastic depth on, stopped mid-epoch at step 3 of 4 per epoch, resumed to step 8."""
    resumed_equals_uninterrupted(tmp_path, image_folder, nproc=1)


def test_resume_mid_epoch_is_bit_exact_on_two_ranks(tmp_path, image_folder):
    resumed_equals_uninterrupted(tmp_path, image_folder, nproc=2)


def metrics_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_two_rank_checkpoint_resumes_on_one_process(tmp_path, image_folder):
    """32 images, 8 per step on 2 ranks: stopped after 24 of epoch 0, the single process
    takes exactly the 8 left (2 steps of 4), then full epochs of 8 steps, on a schedule
    rebuilt for its batch and indexed by progress."""
    extra = {"train.epochs": 2, "optim.batch_size_per_gpu": 4}
    run_train(tiny_overrides(image_folder, tmp_path, **extra, **{"train.max_steps": 3}), nproc=2)
    result = run_train(tiny_overrides(image_folder, tmp_path, **extra))
    assert "resumed from" in result.stdout and "step_00000003.pt" in result.stdout
    assert "total batch 8 -> 4" in result.stdout and "first 24 samples" in result.stdout
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 14))
    assert [r["epoch_samples"] for r in rows[:5]] == [8, 16, 24, 28, 32]
    assert [r["epoch_samples"] for r in rows[5:]] == list(range(4, 33, 4))
    final = torch.load(tmp_path / "checkpoints" / "step_00000013.pt", weights_only=True)
    assert (final["step"], final["epoch"], final["world_size"]) == (13, 2, 1)
    assert final["schedule_step"] == 16  # 2 epochs x 8 steps of the rebuilt schedule


def test_incompatible_model_is_refused_before_anything_changes(tmp_path, image_folder):
    run_train(tiny_overrides(image_folder, tmp_path, **{"train.max_steps": 2}))
    ckpt = tmp_path / "checkpoints" / "step_00000002.pt"
    before = digest(ckpt)
    result = run_train(tiny_overrides(image_folder, tmp_path, **{
        "train.max_steps": 4, "model.out_dim": 128, "model.patch_size": 4}), check=False)
    assert result.returncode == 1
    message = result.stderr + result.stdout
    assert "model.out_dim: 256 in the checkpoint, 128 now" in message
    assert "model.patch_size: 8 in the checkpoint, 4 now" in message
    assert "Traceback" not in message
    assert digest(ckpt) == before and [p.name for p in list_checkpoints(ckpt.parent)] == [ckpt.name]
