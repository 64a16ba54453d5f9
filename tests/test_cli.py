"""End to end through the installed console scripts: dino-train (plain and torchrun) and dino-knn."""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dino_dist.config import Config, apply_override
from tests.conftest import REPO, free_port, subprocess_env

STEPS = 3
DEMO_ARGS = ["--config", str(REPO / "configs" / "demo.yaml"), f"train.max_steps={STEPS}",
             "optim.batch_size_per_gpu=16", "log.every_steps=1", "data.num_workers=1",
             "eval.batch_size=256"]


def console_script(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(path).exists(), f"{name} is not installed: run pip install -e '.[dev]'"
    return path


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result


def check_run_directory(run_dir: Path) -> list[dict]:
    assert (run_dir / "config.yaml").is_file()
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    for key in ("epoch", "loss", "lr", "wd", "teacher_momentum", "teacher_temp", "grad_norm",
                "images_per_s", "data_wait_share", "peak_memory_mb"):
        assert key in train_records[-1], key
    knn = [r for r in records if "knn_top1" in r]
    assert len(knn) == 1 and 0 <= knn[0]["knn_top1"] <= 100
    assert 0 <= knn[0]["knn_top1_random_init"] <= 100
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1))
    assert losses[-1].value == pytest.approx(train_records[-1]["loss"], rel=1e-6)
    state = torch.load(run_dir / "checkpoints" / f"step_{STEPS:08d}.pt", weights_only=True)
    for key in ("student", "teacher", "optimizer", "loss", "step", "epoch", "config"):
        assert key in state
    assert state["step"] == STEPS and state["config"]["train"]["max_steps"] == STEPS
    return records


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_run")
    run([console_script("dino-train"), *DEMO_ARGS, f"train.output_dir={out}"])
    return out


def test_dino_train_writes_the_run_directory(demo_run):
    check_run_directory(demo_run)
    log = (demo_run / "log.txt").read_text()
    assert "k-NN (k=20)" in log and "random init top-1" in log


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                  "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                  "-m", "dino_dist.train", *DEMO_ARGS, f"train.output_dir={out}"])
    check_run_directory(out)
    step_lines = [l for l in result.stdout.splitlines() if f"step {STEPS}/{STEPS}" in l]
    assert len(step_lines) == 1  # rank 1 prints nothing of its own
    assert "rank 0 of 2" in (out / "log.txt").read_text()


def test_dino_knn_on_a_checkpoint(demo_run):
    from dino_dist.data import ensure_demo_dataset

    demo = ensure_demo_dataset(progress=False)
    result = run([console_script("dino-knn"), "--checkpoint",
                  str(demo_run / "checkpoints" / f"step_{STEPS:08d}.pt"),
                  "--train-data", str(demo / "train"), "--val-data", str(demo / "val"),
                  "--batch-size", "256"])
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("k-NN k=20 T=0.07: top-1 ") and "top-5" in line


def test_dino_knn_names_a_corrupt_checkpoint(tmp_path, image_folder):
    bad = tmp_path / "step_00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    result = subprocess.run([console_script("dino-knn"), "--checkpoint", str(bad),
                             "--train-data", str(image_folder), "--val-data", str(image_folder)],
                            env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert str(bad) in result.stderr and "Traceback" not in result.stderr


def config_defaults(section: object, prefix: str = "") -> dict[str, object]:
    """section.key -> default, for every field of every section (and sub-section)."""
    defaults = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            defaults.update(config_defaults(value, f"{prefix}{f.name}."))
        else:
            defaults[f"{prefix}{f.name}"] = value
    return defaults


def help_entries(text: str) -> dict[str, tuple[str, str]]:
    """section.key -> (the default shown, the comment) from dino-train --help."""
    entries: dict[str, list[str]] = {}
    key = None
    for line in text.split("\nconfig keys:", 1)[1].splitlines()[1:]:
        if line.startswith(" " * 6):  # the comment, wrapped over one or more lines
            entries[key][1] = f"{entries[key][1]} {line.strip()}".strip()
        else:
            key, _, shown = line.strip().partition(" = ")
            entries[key] = [shown.split("  (must ")[0], ""]
    return {k: (shown, comment) for k, (shown, comment) in entries.items()}


def test_help_lists_every_config_key_with_its_default_and_comment():
    listed = help_entries(run([console_script("dino-train"), "--help"]).stdout)
    defaults = config_defaults(Config())
    assert list(listed) == list(defaults)
    for key, default in defaults.items():
        shown, comment = listed[key]
        cfg = Config()
        apply_override(cfg, f"{key}={shown}")  # what --help shows is the default, as written
        assert functools.reduce(getattr, key.split("."), cfg) == default, key
        assert comment, f"{key} has no comment in dino_dist/config.py"
    assert listed["train.max_steps"][1] == "stop after this many optimizer steps; 0 = no limit"
    # A comment of several lines above its field arrives whole.
    assert listed["train.dist_timeout_s"][1].startswith("A collective that waits longer than")
    assert listed["train.dist_timeout_s"][1].endswith("since the other ranks wait for it.")
