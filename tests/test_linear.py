"""dino-linear: a linear probe on cached frozen features, in one process and under torchrun,
resumed after a SIGKILL, and its one-line errors.

The images have a linearly separable structure (class c has a bright band at row c), so a
probe on even a barely trained backbone must learn them; whether a trained demo backbone
beats random initialisation takes minutes of training and is measured outside the suite.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dino_dist.cli.linear import main
from dino_dist.eval.linear_features import (FeatureSettings, SeededViews, cache_path,
                                            feature_function, train_transform)
from dino_dist.data import LabelledImageDataset
from dino_dist.models import build_backbone
from tests.conftest import (REPO, free_port, kill_pids, run_train, subprocess_env, tiny_overrides,
                            write_image_folder)

CLASSES, EPOCHS = 8, 5
PROBE_OPTIONS = ["--batch-size", "16", "--lr", "0.5", "--epochs", str(EPOCHS)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Labelled train/val folders and a checkpoint of two training steps."""
    root = tmp_path_factory.mktemp("linear")
    train = write_image_folder(root / "train", classes=CLASSES, per_class=12, size=24, seed=0)
    # 97 images: uneven shards over 2 ranks, and a last batch of one, so one rank's share is empty.
    shutil.copy(train / "class_0" / "img_0_000.png", train / "class_0" / "img_0_999.png")
    val = write_image_folder(root / "val", classes=CLASSES, per_class=4, size=24, seed=1)
    run_train(tiny_overrides(train, root / "run", **{"train.max_steps": 2, "eval.image_size": 16}))
    return {"root": root, "train": train, "val": val,
            "checkpoint": root / "run" / "checkpoints" / "step_00000002.pt"}


def probe_args(inputs: dict, output_dir: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(inputs["checkpoint"]), "--train-data", str(inputs["train"]),
            "--val-data", str(inputs["val"]), "--output-dir", str(output_dir), "--device", "cpu",
            *PROBE_OPTIONS, *extra]


def probe_here(argv: list[str]) -> tuple[int, str]:
    """main() in this process on one thread (as the subprocesses run), and what it printed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            code = main(argv)
    finally:
        torch.set_num_threads(threads)
    return code, printed.getvalue()


def probe_command(argv: list[str], nproc: int = 1) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return [*launcher, "-m", "dino_dist.cli.linear", *argv]


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def saved(output_dir: Path) -> dict:
    return torch.load(output_dir / "classifier.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(inputs) -> tuple[Path, str]:
    """An uninterrupted one-process probe: its folder and what it printed."""
    output_dir = inputs["root"] / "reference"
    code, printed = probe_here(probe_args(inputs, output_dir))
    assert code == 0
    return output_dir, printed


def test_probe_prints_and_writes_its_folder(reference):
    output_dir, printed = reference
    last = printed.strip().splitlines()[-1]
    assert last.startswith(f"linear probe, epoch {EPOCHS}: top-1 ") and "% top-5 " in last
    records = rows(output_dir)
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    for key in ("lr", "train_loss", "train_top1", "train_top5", "val_top1", "val_top5"):
        assert all(0 <= r[key] < 1000 for r in records), key
    assert f"top-1 {records[-1]['val_top1']:.2f}%" in last
    events = EventAccumulator(str(output_dir / "tb"))
    events.Reload()
    val_top1 = events.Scalars("train/val_top1")
    assert [e.step for e in val_top1] == list(range(1, EPOCHS + 1))
    assert val_top1[-1].value == pytest.approx(records[-1]["val_top1"], rel=1e-6)
    state = saved(output_dir)
    assert state["epoch"] == EPOCHS and state["classes"] == [f"class_{c}" for c in range(CLASSES)]
    assert state["classifier"]["weight"].shape == (CLASSES, 4 * 128)  # 4 CLS tokens of vit_mini
    assert state["features"]["image_size"] == 16  # the checkpoint's eval.image_size
    assert len(list(output_dir.glob("features_*.pt"))) == 1
    assert "epoch 1/5" in (output_dir / "log.txt").read_text()


def test_probe_learns_separable_classes(reference):
    records = rows(reference[0])
    chance = 100 / CLASSES
    assert records[-1]["val_top1"] >= 90 > 3 * chance, records[-1]
    assert records[-1]["train_loss"] < records[0]["train_loss"] / 2


def test_two_ranks_equal_one_process(inputs, reference):
    """Features extracted on 2 ranks (each every other image) and the classifier trained on
    2 ranks (each half of every batch, gradients summed) give the one-process result."""
    output_dir = inputs["root"] / "two_ranks"
    result = subprocess.run(probe_command(probe_args(inputs, output_dir), nproc=2), cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("linear probe, epoch") == 1  # printed by rank 0 only
    one, two = saved(reference[0]), saved(output_dir)
    for key, weight in one["classifier"].items():
        error = (two["classifier"][key] - weight).norm() / weight.norm()
        assert error < 1e-5, (key, error.item())
    for mine, theirs in zip(rows(reference[0]), rows(output_dir)):
        for key in ("train_top1", "train_top5", "val_top1", "val_top5"):
            assert mine[key] == theirs[key], (key, mine, theirs)
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)


def test_resume_after_sigkill_equals_the_uninterrupted_probe(inputs, reference):
    """Killed while saving epoch 3 (saves are slowed down), started again: it reuses the
    feature cache, continues from epoch 2 and ends with exactly the reference's classifier."""
    output_dir = inputs["root"] / "killed"
    output_dir.mkdir()
    cache = next(reference[0].glob("features_*.pt"))
    shutil.copy2(cache, output_dir / cache.name)
    env = subprocess_env() | {"DINO_DIST_TEST_SAVE_DELAY_S": "2"}
    child = subprocess.Popen(probe_command(probe_args(inputs, output_dir)), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ((output_dir / "metrics.jsonl").is_file() and len(rows(output_dir)) >= 2):
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
        time.sleep(0.05)
    kill_pids([child.pid])
    child.wait()
    assert saved(output_dir)["epoch"] == 2 and len(rows(output_dir)) == 2
    code, printed = probe_here(probe_args(inputs, output_dir))
    assert code == 0 and "epoch 3/5" in printed and "epoch 2/5" not in printed
    assert list(output_dir.glob("features_*.pt")) == [output_dir / cache.name]
    assert [r["epoch"] for r in rows(output_dir)] == list(range(1, EPOCHS + 1))
    assert rows(output_dir)[-1] == rows(reference[0])[-1]
    for key, weight in saved(reference[0])["classifier"].items():
        assert torch.equal(saved(output_dir)["classifier"][key], weight), key


def test_more_epochs_continue_and_other_settings_are_refused(inputs, reference, capsys):
    output_dir = inputs["root"] / "continued"
    shutil.copytree(reference[0], output_dir)
    logged = (output_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (output_dir / "metrics.jsonl").write_text("".join(logged[:-1]))  # as if killed before it
    code, printed = probe_here(probe_args(inputs, output_dir, "--epochs", str(EPOCHS + 1)))
    assert code == 0 and f"epoch {EPOCHS + 1}/{EPOCHS + 1}" in printed
    assert [r["epoch"] for r in rows(output_dir)] == list(range(1, EPOCHS + 2))
    assert rows(output_dir)[EPOCHS - 1] == rows(reference[0])[-1]  # the missing row, restored
    code, _ = probe_here(probe_args(inputs, output_dir, "--lr", "0.1"))
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("dino-linear: error: ") and "another --output-dir" in error


@pytest.mark.parametrize("case, replace, expected", [
    ("missing train folder", {"--train-data": "missing"}, "does not exist"),
    ("empty val folder", {"--val-data": "empty"}, "contains no images"),
    ("corrupt checkpoint", {"--checkpoint": "corrupt.pt"}, "corrupt.pt"),
    ("other class sets", {"--val-data": "other_classes"}, "different class folders (class_7)"),
    ("too many blocks", {"--n-last-blocks": "5"}, "pick 1 to 4"),
])
def test_user_mistakes_get_one_line_and_exit_2(inputs, tmp_path, capsys, case, replace, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    write_image_folder(tmp_path / "other_classes", classes=CLASSES - 1, per_class=2, size=24)
    argv = probe_args(inputs, tmp_path / "out")
    for option, value in replace.items():
        path = tmp_path / value
        if option in argv:
            argv[argv.index(option) + 1] = str(path)
        else:
            argv += [option, value]
    code, _ = probe_here(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (case, lines)
    assert lines[0].startswith("dino-linear: error: ") and expected in lines[0], (case, lines)
    assert not (tmp_path / "out").exists()  # nothing written for bad input


@pytest.mark.parametrize("option, value, expected", [
    ("--epochs", "0", "argument --epochs: expected a whole number of at least 1"),
    ("--train-views", "-1", "argument --train-views: expected a whole number of at least 0"),
    ("--device", "cuda", "no CUDA device is visible"),
])
def test_bad_option_values_stop_at_parsing(inputs, tmp_path, capsys, option, value, expected):
    if option == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    with pytest.raises(SystemExit) as stopped:
        main(probe_args(inputs, tmp_path / "out", option, value))
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and error.startswith("dino-linear: error: ") and expected in error


def test_vit_features_are_the_last_cls_tokens_and_the_mean_patch_token():
    torch.manual_seed(0)
    backbone = build_backbone("vit_mini", patch_size=8, img_size=16).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        last = feature_function(backbone, FeatureSettings(1, False, 16, 0, 0))(images)
        torch.testing.assert_close(last, backbone(images))  # the training forward's output
        both = feature_function(backbone, FeatureSettings(2, True, 16, 0, 0))(images)
        blocks = backbone.get_intermediate_layers(images, 2)
    assert both.shape == (3, 3 * 128)
    torch.testing.assert_close(both[:, 128:256], last)
    torch.testing.assert_close(both[:, 256:], blocks[-1][:, 1:].mean(dim=1))


def test_augmented_views_depend_only_on_seed_view_and_image(inputs):
    images = LabelledImageDataset(inputs["train"], train_transform(16))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    view0, again, view1 = SeededViews(images, 0, 0), SeededViews(images, 0, 0), SeededViews(images, 0, 1)
    assert torch.equal(view0[5][0], again[5][0])
    assert not torch.equal(view0[5][0], view1[5][0])
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream untouched


def test_cache_name_follows_checkpoint_files_and_settings(tmp_path):
    folder = tmp_path / "step_00000010"  # an FSDP checkpoint folder
    folder.mkdir()
    (folder / "COMMITTED.json").write_text("{}")
    settings = FeatureSettings(4, False, 16, 0, 0)
    name = cache_path(tmp_path, folder, ["a.png"], ["b.png"], settings)
    assert name == cache_path(tmp_path, folder, ["a.png"], ["b.png"], settings)
    assert name != cache_path(tmp_path, folder, ["a.png"], ["b.png"], FeatureSettings(4, True, 16, 0, 0))
    assert name != cache_path(tmp_path, folder, ["a.png", "c.png"], ["b.png"], settings)
    (folder / "shard_0.distcp").write_bytes(b"weights")
    assert name != cache_path(tmp_path, folder, ["a.png"], ["b.png"], settings)


def test_resnet_features_are_its_pooled_output_with_frozen_batchnorm():
    torch.manual_seed(0)
    backbone = build_backbone("resnet50")  # built in training mode
    features = feature_function(backbone, FeatureSettings(4, False, 32, 0, 0))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        both, first = features(images), features(images[:1])
    assert both.shape == (2, 2048)
    # running statistics: no batch dependence (batch statistics would move them by ~1)
    torch.testing.assert_close(both[:1], first, atol=1e-3, rtol=1e-3)
