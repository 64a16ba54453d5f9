"""What a run leaves on disk: epoch-end checkpoints, skipped-image accounting, resuming."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from tests.conftest import REPO, free_port, run_train, subprocess_env, tiny_overrides, write_image_folder


def metrics(run_dir) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_checkpoint_per_epoch_and_corrupt_images_counted(tmp_path):
    data = write_image_folder(tmp_path / "images", classes=2, per_class=16)
    (data / "class_0" / "broken.png").write_bytes(b"\x89PNG this is not an image")
    out = tmp_path / "run"
    result = run_train(tiny_overrides(data, out, **{"train.epochs": 2, "optim.batch_size_per_gpu": 11}))
    names = sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))
    assert names == ["step_00000003.pt", "step_00000006.pt"]  # 33 images // 11 = 3 steps/epoch
    state = torch.load(out / "checkpoints" / names[0], weights_only=True)
    assert (state["step"], state["epoch"]) == (3, 1)
    assert metrics(out)[-1]["skipped_images"] == 2  # the broken file, once per epoch
    assert "broken.png" in result.stderr + result.stdout


def test_restart_resumes_from_the_newest_checkpoint(tmp_path, image_folder):
    out = tmp_path / "run"
    run_train(tiny_overrides(image_folder, out, **{"train.max_steps": 4}))
    result = run_train(tiny_overrides(image_folder, out, **{"train.max_steps": 6}))
    assert "resumed from" in result.stdout and "step_00000004.pt" in result.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]  # appended, not rewritten
    assert "train.max_steps: 4 -> 6" in (out / "log.txt").read_text()


def test_plain_folder_without_labels_trains(tmp_path):
    data = write_image_folder(tmp_path / "plain", classes=2, per_class=8, labelled=False)
    assert not any(p.is_dir() for p in data.iterdir())
    out = tmp_path / "run"
    run_train(tiny_overrides(data, out, **{"train.max_steps": 2}))
    assert (out / "checkpoints" / "step_00000002.pt").is_file()


def test_knn_feature_extraction_sharded_over_two_ranks(tmp_path, image_folder):
    out = tmp_path / "run"
    run_train(tiny_overrides(image_folder, out, **{"train.max_steps": 1}))
    args = ["--checkpoint", str(out / "checkpoints" / "step_00000001.pt"), "--train-data",
            str(image_folder), "--val-data", str(image_folder), "--image-size", "16", "--k", "5"]
    single = subprocess.run([sys.executable, "-m", "dino_dist.cli.knn", *args], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                             "-m", "dino_dist.cli.knn", *args], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0 and double.returncode == 0, single.stderr + double.stderr
    single_line = single.stdout.strip().splitlines()[-1]
    assert double.stdout.strip().splitlines() == [single_line]  # same numbers, printed once
    assert "top-1 100.00%" in single_line  # the train set is the val set: each image finds itself
