"""The paths the README offers, run with the defaults a user gets.

The demo config as it ships (k-NN at the end, the last layer frozen in the first epoch,
periodic evaluation), for each `train.parallel`: a stop inside the first epoch (while the last
layer is frozen), a resume at the same world size that must equal the run that never stopped,
a resume at another world size, and the commands that read the result (`dino-export`,
`dino-knn`). Only the step count and evaluation cadence are shrunk.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_dist.config import ConfigError, load_config
from dino_dist.models import build_backbone
from dino_dist.training.build import require_koleo_neighbours
from tests.conftest import (REPO, max_relative_error, run_train, state_at, subprocess_env,
                            tiny_overrides, write_image_folder)

STOP, END = 5, 22  # the demo's epoch is 20 steps on 2 ranks: END runs past its first end


def demo_overrides(run_dir: Path, parallel: str, max_steps: int = END) -> list[str]:
    extra = ["checkpoint.async_save=true"] if parallel == "fsdp" else []
    return [f"train.output_dir={run_dir}", f"train.parallel={parallel}",
            f"train.max_steps={max_steps}", f"checkpoint.every_steps={STOP}",
            "eval.every_epochs=1", "checkpoint.keep_last=10", *extra]


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def command(module: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def demo_run(request, tmp_path_factory) -> tuple[str, Path]:
    """The demo config on 2 ranks, uninterrupted to END, saving every STOP steps."""
    run_dir = tmp_path_factory.mktemp(f"demo_{request.param}")
    result = run_train(demo_overrides(run_dir, request.param), nproc=2, timeout=400)
    assert "evaluation at epoch 1 (step 20): knn_top1" in result.stdout
    assert "k-NN (k=20)" in result.stdout and "random init" in result.stdout
    return request.param, run_dir


def test_demo_defaults_finish_with_evaluations(demo_run):
    parallel, run_dir = demo_run
    rows = metric_rows(run_dir)
    assert any("knn_top1" in r and r["step"] == 20 and "val_loss" in r for r in rows)
    assert any("knn_top1_random_init" in r and r["step"] == END for r in rows)
    summary = json.loads((run_dir / "training_summary.json").read_text())
    assert summary["stop_reason"] == "max_steps" or summary["steps"] == END
    best = list((run_dir / "checkpoints" / "best").iterdir())
    assert best, "the periodic evaluation's best checkpoint is missing"


def test_resume_inside_the_frozen_first_epoch_equals_the_uninterrupted_run(demo_run, tmp_path):
    parallel, run_dir = demo_run
    name = f"step_{STOP:08d}" + (".pt" if parallel == "ddp" else "")
    (tmp_path / "checkpoints").mkdir()
    copy = shutil.copytree if parallel == "fsdp" else shutil.copy2
    copy(run_dir / "checkpoints" / name, tmp_path / "checkpoints" / name)
    if parallel == "ddp":
        shutil.copy2(run_dir / "checkpoints" / f"{name}.manifest.json", tmp_path / "checkpoints")
    result = run_train(demo_overrides(tmp_path, parallel), nproc=2, timeout=400)
    assert f"resumed from {tmp_path / 'checkpoints' / name} (step {STOP}" in result.stdout
    resumed, reference = state_at(tmp_path, END), state_at(run_dir, END)
    for part in ("student", "teacher", "loss"):
        err, key = max_relative_error(resumed[part], reference[part])
        assert err < 1e-6, f"{part}.{key} differs by {err:.2e} relative"
    losses = {r["step"]: r["loss"] for r in metric_rows(run_dir) if "loss" in r}
    resumed_losses = {r["step"]: r["loss"] for r in metric_rows(tmp_path) if "loss" in r}
    assert resumed_losses == {s: v for s, v in losses.items() if s > STOP}


def test_resume_inside_the_first_epoch_on_another_world_size(demo_run, tmp_path):
    parallel, run_dir = demo_run
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    for newer in tmp_path.glob("checkpoints/step_*"):
        if int(newer.name[5:13]) > STOP:
            shutil.rmtree(newer) if newer.is_dir() else newer.unlink()
    shutil.rmtree(tmp_path / "checkpoints" / "best")
    result = run_train(demo_overrides(tmp_path, parallel, max_steps=STOP + 2), timeout=400)
    assert "total batch 128 -> 64" in result.stdout
    assert f"first {STOP * 128} samples" in result.stdout
    assert "k-NN (k=20)" in result.stdout
    assert state_at(tmp_path, STOP + 2)["world_size"] == 1


def test_export_and_knn_read_the_result(demo_run, tmp_path):
    """dino-export and dino-knn on the final checkpoint (an FSDP folder under fsdp): the
    export loads strictly, and dino-knn in one process agrees with the run's own k-NN."""
    parallel, run_dir = demo_run
    checkpoint = run_dir / "checkpoints" / (f"step_{END:08d}" + (".pt" if parallel == "ddp" else ""))
    exported = tmp_path / "teacher.pth"
    command("dino_dist.cli.export", str(checkpoint), "--output", str(exported))
    weights = torch.load(exported, weights_only=True)
    backbone = build_backbone("vit_mini", 8, 0.0, 32)
    backbone.load_state_dict(weights, strict=True)
    teacher = state_at(run_dir, END)["teacher"]
    assert torch.equal(weights["pos_embed"], teacher["backbone.pos_embed"])
    log = (run_dir / "log.txt").read_text()
    val_dir = Path(log.split("k-NN (k=20) on ", 1)[1].split(":", 1)[0])
    knn = command("dino_dist.cli.knn", "--checkpoint", str(checkpoint), "--train-data",
                  str(val_dir.parent / "train"), "--val-data", str(val_dir), "--device", "cpu")
    top1 = float(knn.stdout.split("top-1 ", 1)[1].split("%", 1)[0])
    run_top1 = next(r["knn_top1"] for r in metric_rows(run_dir) if "knn_top1_random_init" in r)
    assert abs(top1 - run_top1) <= 100 / 600 + 1e-9, (top1, run_top1)  # at most one image


def test_sharded_evaluation_with_uneven_shards(tmp_path):
    """33 labelled images on 2 FSDP ranks with batch 4: one rank runs a batch more, so the
    other runs a stand-in forward; k-NN at the end and periodic evaluation both finish."""
    data = write_image_folder(tmp_path / "images", classes=3, per_class=11)
    result = run_train(tiny_overrides(data, tmp_path / "run", **{
        "train.parallel": "fsdp", "train.epochs": 1, "eval.knn_at_end": True,
        "eval.train_path": data, "eval.val_path": data, "eval.every_epochs": 1,
        "eval.val_loss_path": data, "eval.batch_size": 4, "eval.image_size": 16,
        "optim.freeze_last_layer": 1, "optim.batch_size_per_gpu": 4}), nproc=2)
    assert "evaluation at epoch 1" in result.stdout and "k-NN (k=20)" in result.stdout


def test_own_folder_with_the_default_config_says_so_at_start_and_exits_0(tmp_path):
    """`dino-train data.path=DIR`: the demo config asks for k-NN at the end, which needs
    labelled folders; the run says so before training, trains and exits 0."""
    photos = write_image_folder(tmp_path / "photos", labelled=False)
    result = run_train([f"data.path={photos}", f"train.output_dir={tmp_path / 'run'}",
                        "train.max_steps=2", "optim.batch_size_per_gpu=8"])
    before_training = result.stdout.split("training vit_mini", 1)[0]
    assert "eval.knn_at_end=true, but data.path is not the demo" in before_training
    assert "eval.train_path=DIR eval.val_path=DIR" in before_training
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["steps"] == 2


def test_missing_evaluation_folder_stops_before_the_first_step(tmp_path):
    photos = write_image_folder(tmp_path / "photos", labelled=False)
    result = run_train([f"data.path={photos}", f"train.output_dir={tmp_path / 'run'}",
                        f"eval.train_path={tmp_path / 'nowhere'}", f"eval.val_path={photos}"],
                       check=False)
    assert result.returncode != 0
    assert f"evaluation folder '{tmp_path / 'nowhere'}' does not exist" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or \
        not list((tmp_path / "run" / "checkpoints").iterdir())


def test_batch_of_one_with_the_default_koleo_term_stops_before_the_first_step(tmp_path):
    """The demo recipe's KoLeo term needs a nearest other image: one image alone would be
    its own neighbour, at distance eps, a loss of ~32 and a gradient of pure noise."""
    photos = write_image_folder(tmp_path / "photos", labelled=False)
    result = run_train([f"data.path={photos}", f"train.output_dir={tmp_path / 'run'}",
                        "optim.batch_size_per_gpu=1", "eval.knn_at_end=false"], check=False)
    assert result.returncode != 0
    said = result.stderr + result.stdout
    assert "loss.koleo_weight=0.1 needs at least 2 images per micro-batch" in said, said
    assert "raise optim.batch_size_per_gpu, or set loss.koleo_weight=0" in said
    assert "Traceback" not in result.stderr and "step 1/" not in said


@pytest.mark.parametrize("scope, world_size, allowed", [
    ("global", 2, True),     # one image per rank: 2 rows over the ranks
    ("per_rank", 2, False),  # dinov2's form sees one rank's rows only
    ("global", 1, False)])
def test_koleo_batch_rule_counts_the_rows_koleo_sees(scope, world_size, allowed):
    cfg = load_config(None, ["optim.batch_size_per_gpu=1", f"loss.koleo_scope={scope}"])
    if allowed:
        require_koleo_neighbours(cfg, world_size)
    else:
        with pytest.raises(ConfigError, match="needs at least 2 images"):
            require_koleo_neighbours(cfg, world_size)
