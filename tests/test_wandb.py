"""W&B, offline (no network here): what a run logs is read back from the run's own .wandb file.

The .wandb file is W&B's transaction log: LevelDB-style records in 32 KiB blocks, each a
serialized `wandb_internal_pb2.Record`; wandb 0.31 ships no Python reader, so a small one is
below.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from wandb.proto import wandb_internal_pb2  # in the dev extra, as wandb itself

from dino_dist.config import config_from_dict
from dino_dist.observe.metrics import MetricsWriter
from dino_dist.observe.wandb_sink import RUN_ID_FILE, WandbSink
from tests.conftest import run_train, tiny_overrides, write_image_folder


BLOCK, RECORD_HEADER = 32768, 7  # checksum (4), length (2), type (1); the file header is 7 too
FULL, LAST = 1, 4


def wandb_records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    offset, pieces = RECORD_HEADER, []
    while offset + RECORD_HEADER <= len(data):
        if BLOCK - offset % BLOCK < RECORD_HEADER:  # a block's tail too short for a header
            offset += BLOCK - offset % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[offset + 4: offset + RECORD_HEADER])
        pieces.append(data[offset + RECORD_HEADER: offset + RECORD_HEADER + length])
        offset += RECORD_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def logged(run_folder: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) of one offline run folder."""
    run_id, config, rows = "", {}, []
    for record in wandb_records(next(run_folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return run_id, config, rows


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    """No key, no netrc, no W&B settings from the machine (HOME is a fresh folder)."""
    for name in list(os.environ):
        if name.startswith("WANDB_") or name == "NETRC":
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def dino_log():
    """What the dino_dist logger says in this process (it may not propagate to the root)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("dino_dist")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_offline_run_logs_what_metrics_jsonl_holds_and_a_restart_continues_it(
        tmp_path, no_wandb_credentials, monkeypatch):
    data = write_image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    run_train(tiny_overrides(data, run_dir, **{"train.max_steps": 3, "log.wandb": "true"}))
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    log = (run_dir / "log.txt").read_text()
    assert log.count("logging offline") == 1 and "no API key" in log, log

    monkeypatch.setenv("WANDB_MODE", "offline")  # the user's own choice is respected too
    run_train(tiny_overrides(data, run_dir, **{"train.max_steps": 5, "log.wandb": "true"}))
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    assert "offline by WANDB_MODE" in (run_dir / "log.txt").read_text()

    first, second = offline_runs(run_dir)  # one folder per process, both for the same run
    losses_in_wandb = {}
    for folder in (first, second):
        logged_id, config, rows = logged(folder)
        assert logged_id == run_id and folder.name.endswith(run_id)
        assert config["model"]["arch"] == "vit_mini" and config["log"]["wandb"] is True
        losses_in_wandb.update({row["step"]: row["train/loss"] for row in rows})
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses_in_jsonl = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses_in_jsonl) == [1, 2, 3, 4, 5]
    assert losses_in_wandb == losses_in_jsonl  # every step, to the last bit, final loss included


def test_training_goes_on_with_one_warning_when_wandb_cannot_be_imported(
        tmp_path, no_wandb_credentials, monkeypatch):
    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('wandb is broken in this test')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))  # found before the real wandb
    run_dir = tmp_path / "run"
    data = write_image_folder(tmp_path / "images")
    run_train(tiny_overrides(data, run_dir, **{"train.max_steps": 2, "log.wandb": "true"}))
    assert (run_dir / "checkpoints" / "step_00000002.pt").is_file()
    warnings = [line for line in (run_dir / "log.txt").read_text().splitlines()
                if 'pip install -e ".[wandb]"' in line]
    assert len(warnings) == 1, warnings
    assert not (run_dir / "wandb").exists() and not (run_dir / RUN_ID_FILE).exists()


def test_images_and_config_reach_wandb(tmp_path, no_wandb_credentials, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = config_from_dict({"log": {"wandb": True, "wandb_project": "p"},
                            "model": {"arch": "vit_mini", "patch_size": 8}})
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, config=cfg)
    writer.write(7, {"loss": 1.25, "warnings": ["not a scalar"]})
    grid = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    writer.add_images("attention", grid, 7)
    writer.close()
    wandb.teardown()  # waits for W&B's service to write out the transaction log
    folder = offline_runs(tmp_path)[0]
    run_id, config, rows = logged(folder)
    assert run_id == (tmp_path / RUN_ID_FILE).read_text().strip()
    assert config["model"]["patch_size"] == 8
    scalars, images = rows
    assert scalars["step"] == 7 and scalars["train/loss"] == 1.25
    assert "train/warnings" not in scalars  # the same scalars as TensorBoard, no text
    assert images["step"] == 7 and images["attention/_type"] == "images/separated"
    saved = [np.asarray(Image.open(folder / "files" / name))
             for name in images["attention/filenames"]]
    expected = (grid * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.stack(saved), expected)  # the pictures themselves, not black


class FailingRun:
    def __init__(self):
        self.calls = 0

    def log(self, values):
        self.calls += 1
        raise ConnectionError("W&B backend went away\nsecond line of the traceback text")


def test_a_wandb_error_switches_wandb_off_once_and_metrics_go_on(tmp_path, dino_log):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.wandb = WandbSink(FailingRun(), None)
    run = writer.wandb.run
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    assert run.calls == 1
    assert dino_log == ["W&B is off from here on (ConnectionError: W&B backend went away); "
                        "training goes on"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    writer.close()  # a switched-off sink closes quietly


def test_a_failing_init_is_one_warning_and_no_sink(tmp_path, no_wandb_credentials, monkeypatch,
                                                   dino_log):
    import wandb

    def refuse(**kwargs):
        raise wandb.Error("cannot reach api.wandb.ai")
    monkeypatch.setattr(wandb, "init", refuse)
    assert WandbSink.start(tmp_path, "p", "", {}) is None
    assert dino_log == ["W&B is off for this run (Error: cannot reach api.wandb.ai); training "
                        "goes on"]
