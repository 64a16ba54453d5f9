"""Periodic evaluation, the best checkpoint, early stopping on 2 gloo ranks, and the summary."""
from __future__ import annotations

import json

import torch

from dino_dist.checkpoint.directory import list_checkpoints
from dino_dist.checkpoint.reader import load_checkpoint
from dino_dist.checkpoint.single_file import read_manifest
from dino_dist.eval.periodic import MetricTracker
from tests.conftest import run_train, tiny_overrides, write_image_folder


def test_tracker_counts_evaluations_without_improvement():
    loss = MetricTracker("val_loss", "min", min_delta=0.1)
    assert loss.update(5.0, step=10, epoch=1)  # the first value is the best so far
    assert not loss.update(4.95, 20, 2)  # better, but not by more than min_delta
    assert loss.update(4.8, 30, 3) and loss.evals_without_improvement == 0
    assert not loss.update(4.9, 40, 4) and loss.evals_without_improvement == 1
    assert (loss.best, loss.best_step, loss.best_epoch) == (4.8, 30, 3)
    knn = MetricTracker("knn_top1", "max")
    knn.update(40.0, 1, 1)
    assert knn.update(41.0, 2, 2) and not knn.update(41.0, 3, 3)


def test_early_stopping_on_two_ranks_stops_together_with_a_final_checkpoint(tmp_path):
    data = write_image_folder(tmp_path / "images")  # 32 images: 2 steps per epoch on 2 ranks
    run_dir = tmp_path / "run"
    # No evaluation improves val_loss by more than 100: the metric has stopped improving.
    overrides = tiny_overrides(data, run_dir, **{
        "train.epochs": 6, "eval.every_epochs": 1, "eval.val_loss_path": str(data),
        "eval.batch_size": 16, "train.early_stopping.enabled": "true",
        "train.early_stopping.metric": "val_loss", "train.early_stopping.patience": 2,
        "train.early_stopping.min_delta": 100, "log.every_steps": 2})
    result = run_train(overrides, nproc=2)
    assert "early stopping: val_loss did not improve" in result.stdout

    summary = json.loads((run_dir / "training_summary.json").read_text())
    assert summary["stop_reason"].startswith("early stopping: val_loss did not improve")
    assert (summary["steps"], summary["epochs"], summary["world_size"]) == (6, 3, 2)
    assert summary["images"] == 6 * 16 and summary["images_per_s"] > 0
    assert summary["best"]["metric"] == "val_loss" and summary["best"]["best_epoch"] == 1
    assert "val_loss" in summary["final_metrics"]

    newest = list_checkpoints(run_dir / "checkpoints")[0]
    read_manifest(newest)  # committed and intact
    state = load_checkpoint(newest)
    assert (state["step"], state["epoch"]) == (6, 3)
    assert state["evaluation"]["early_stopping"]["evals_without_improvement"] == 2
    best = list_checkpoints(run_dir / "checkpoints" / "best")
    assert [p.name for p in best] == ["step_00000002.pt"]  # epoch 1's val_loss stayed best
    read_manifest(best[0])
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 6
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 6]

    # A restart of the stopped run stays stopped: no further steps, the same verdict.
    result = run_train(overrides)
    assert "step 7" not in result.stdout
    summary = json.loads((run_dir / "training_summary.json").read_text())
    assert summary["stop_reason"].startswith("early stopping") and summary["steps"] == 6


def test_periodic_evaluation_changes_nothing_in_training(tmp_path):
    data = write_image_folder(tmp_path / "images")
    evaluated, plain = tmp_path / "evaluated", tmp_path / "plain"
    # Stochastic depth on: evaluation must not move the RNG streams training draws from.
    common = {"model.drop_path_rate": 0.1}
    run_train(tiny_overrides(data, evaluated, **common, **{
        "eval.every_epochs": 1, "eval.train_path": str(data), "eval.val_path": str(data),
        "eval.val_loss_path": str(data), "eval.image_size": 16, "eval.batch_size": 16}))
    run_train(tiny_overrides(data, plain, **common))
    a = load_checkpoint(list_checkpoints(evaluated / "checkpoints")[0])
    b = load_checkpoint(list_checkpoints(plain / "checkpoints")[0])
    assert a["step"] == b["step"] == 8
    for part in ("student", "teacher", "loss"):
        for key, tensor in b[part].items():
            assert torch.equal(a[part][key], tensor), f"{part}.{key}"
    # The evaluations really ran, at both epoch ends, else 'changes nothing' proves nothing.
    records = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in evaluations] == [4, 8]
    assert all(0 <= r["knn_top1"] <= 100 and r["val_loss"] > 0 for r in evaluations)
    summary = json.loads((evaluated / "training_summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["best"]["metric"] == "knn_top1"
    assert summary["best"]["best"] == max(r["knn_top1"] for r in evaluations)
    assert summary["final_metrics"]["knn_top1"] == evaluations[-1]["knn_top1"]


def test_a_run_stopped_by_non_finite_steps_says_so_in_its_summary(tmp_path):
    data = write_image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    # An absurd lr makes the weights overflow after the first step: every later loss is NaN.
    result = run_train(tiny_overrides(data, run_dir, **{
        "optim.lr": 1e36, "optim.clip_grad": 0, "train.max_nonfinite_steps": 1}), check=False)
    assert result.returncode == 1
    summary = json.loads((run_dir / "training_summary.json").read_text())
    assert summary["stop_reason"].startswith("error: 2 optimizer steps in a row had a non-finite")
    assert summary["final_metrics"]["skipped_steps"] == 1 and summary["steps"] == 2
