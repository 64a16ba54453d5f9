"""Training on tar shards with real processes: exact resume after SIGKILL at another world size
and loader count (the samples each step saw, logged, equal an uninterrupted run's), shards
served by a real S3-compatible HTTP server (moto's) train bit for bit as from local disk, also
through a proxy that drops connections, and a bad shard set stops the run before its first step."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_dist.data.shard_scan import index_shards
from dino_dist.data.shard_store import LocalStore
from dino_dist.observe.sample_log import ENV as SAMPLE_LOG_ENV
from tests.conftest import (REPO, free_port, max_relative_error, run_train, state_at,
                            subprocess_env, tiny_overrides)
from tests.flaky_proxy import FlakyProxy
from tests.s3_server import start_s3_server

webdataset = pytest.importorskip("webdataset")

SAMPLES, PER_SHARD = 48, 8  # 6 shards; sample i carries label i, so labels name samples
BATCH = 8  # per rank on 2 ranks: 16 a step, 3 steps an epoch
RUN = {"train.epochs": 2, "optim.batch_size_per_gpu": BATCH, "checkpoint.every_steps": 1,
       "checkpoint.keep_last": 3}
FINAL = 6


def png_bytes(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, size=(size, size, 3), dtype=np.uint8)
    pixels[(seed % 3) * 8:(seed % 3) * 8 + 6] += 120
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, bad: tuple[int, ...] = ()) -> Path:
    """webdataset shards of unique-labelled PNGs (samples in `bad` hold garbage), indexed."""
    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(folder / "%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i in range(SAMPLES):
            image = b"not an image" if i in bad else png_bytes(i)
            sink.write({"__key__": f"sample{i:04d}", "png": image, "cls": str(i).encode()})
    index_shards(LocalStore(folder), workers=1, progress=False)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards") / "set")


def global_order(logs: list[Path]) -> list[int]:
    """The labels trained on, in the epoch order, from the sample logs of consecutive launches.

    A step a later launch ran again (after a kill) counts as that launch ran it. Within a step,
    micro-batches come in order and the ranks' samples interleave (the sampler deals round-robin).
    """
    steps: dict[int, list[dict]] = {}
    for log in logs:
        launch = defaultdict(list)
        for line in log.read_text().splitlines():
            record = json.loads(line)
            launch[record["step"]].append(record)
        steps.update(launch)
    order = []
    for step in sorted(steps):
        for micro in sorted({r["micro"] for r in steps[step]}):
            ranks = sorted((r for r in steps[step] if r["micro"] == micro), key=lambda r: r["rank"])
            assert len(ranks) == ranks[0]["world"], f"step {step}: a rank's samples are missing"
            order += [label for dealt in zip(*(r["labels"] for r in ranks)) for label in dealt]
    return order


def assert_same_state(a: dict, b: dict, tolerance: float) -> None:
    for part in ("student", "teacher", "loss"):
        err, key = max_relative_error(a[part], b[part])
        assert err <= tolerance, f"{part}.{key} differs by {err:.2e} relative"


def train_command(overrides: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "dino_dist.train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dino_dist.train",
            *overrides]


def run_until_killed(overrides: list[str], nproc: int, env: dict, checkpoints: Path,
                     kill_after: int) -> None:
    """Start a run, SIGKILL its whole process tree once step `kill_after` is saved."""
    process = subprocess.Popen(train_command(overrides, nproc), cwd=REPO, start_new_session=True,
                               env={**subprocess_env(), **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    saved = checkpoints / f"step_{kill_after:08d}.pt.manifest.json"
    deadline = time.monotonic() + 180
    while not saved.exists():
        assert process.poll() is None, f"the run ended before step {kill_after}:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"step {kill_after} was not saved in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_sigkill_mid_epoch_then_resume_on_1_then_2_ranks_sees_the_same_samples(shards, tmp_path):
    straight_log = tmp_path / "straight.jsonl"
    env = subprocess_env()
    common = dict(RUN)
    straight = tmp_path / "straight"
    cmd = train_command(tiny_overrides(shards, straight, **common), 2)
    subprocess.run(cmd, cwd=REPO, env={**env, SAMPLE_LOG_ENV: str(straight_log)}, check=True,
                   capture_output=True, timeout=240)

    run_dir, logs = tmp_path / "resumed", []
    checkpoints = run_dir / "checkpoints"
    # 2 ranks x 8 with one loader process each, killed mid-epoch 1 ...
    logs.append(tmp_path / "launch1.jsonl")
    run_until_killed(tiny_overrides(shards, run_dir, **{**common, "data.num_workers": 1}), 2,
                     {SAMPLE_LOG_ENV: str(logs[-1]), "DINO_DIST_TEST_STEP_DELAY_S": "1"},
                     checkpoints, kill_after=1)
    # ... then 1 rank x 16 (the same total batch) with two loader processes, killed in epoch 2 ...
    logs.append(tmp_path / "launch2.jsonl")
    one_rank = {**common, "data.num_workers": 2, "optim.batch_size_per_gpu": 2 * BATCH}
    run_until_killed(tiny_overrides(shards, run_dir, **one_rank), 1, {SAMPLE_LOG_ENV: str(logs[-1]), "DINO_DIST_TEST_STEP_DELAY_S": "1"},
                     checkpoints, kill_after=4)
    # ... and 2 ranks again, loading in the trainer, to the end.
    logs.append(tmp_path / "launch3.jsonl")
    result = subprocess.run(train_command(tiny_overrides(shards, run_dir, **common), 2), cwd=REPO,
                            env={**env, SAMPLE_LOG_ENV: str(logs[-1])}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming on 2 processes a checkpoint written by 1" in result.stdout + result.stderr

    first_steps = [min(json.loads(line)["step"] for line in log.read_text().splitlines())
                   for log in logs]
    assert first_steps[0] == 1 and first_steps[1] in (2, 3) and first_steps[2] >= 5, first_steps
    expected = global_order([straight_log])
    assert sorted(expected[:SAMPLES]) == list(range(SAMPLES)) == sorted(expected[SAMPLES:])
    assert global_order(logs) == expected
    assert_same_state(state_at(run_dir, FINAL), state_at(straight, FINAL), 1e-5)


# ---------------------------------------------------------------- S3-compatible storage

S3_RUN = {"train.epochs": 1, "optim.batch_size_per_gpu": 8, "data.num_workers": 2,
          "checkpoint.every_steps": 1}
S3_FINAL = 6


@pytest.fixture(scope="module")
def s3(shards):
    """moto's standalone S3 server holding the shard set (shards and index) under a prefix."""
    import boto3

    endpoint, stop = start_s3_server()
    credentials = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="datasets")
    for path in sorted(shards.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            client.upload_file(str(path), "datasets", f"set/{path.relative_to(shards)}")
    yield endpoint, credentials
    stop()


def s3_overrides(data_path: str, out: Path, **extra) -> list[str]:
    return tiny_overrides(data_path, out, **{**S3_RUN, "data.index_cache": out / "index", **extra})


def train_once(data_path: str, out: Path, env: dict, **extra) -> dict:
    result = subprocess.run(train_command(s3_overrides(data_path, out, **extra), 1), cwd=REPO,
                            env={**subprocess_env(), **env}, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if extra.get("eval.knn_at_end"):
        assert re.search(r"k-NN .*top-1 \d", result.stdout + result.stderr), result.stdout[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row.get("skipped_images", 0) == 0 for row in rows), "a sample was skipped"
    return state_at(out, S3_FINAL)


@pytest.fixture(scope="module")
def local_state(shards, tmp_path_factory) -> dict:
    return train_once(str(shards), tmp_path_factory.mktemp("local_run"), {})


def assert_bit_for_bit(a: dict, b: dict) -> None:
    for part in ("student", "teacher", "loss"):
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"


def test_training_from_s3_equals_training_from_local_disk_bit_for_bit(s3, shards, local_state, tmp_path):
    _, credentials = s3
    # The k-NN report at the end reads its labelled bank from S3 too, its queries from disk.
    knn = {"eval.knn_at_end": True, "eval.train_path": "s3://datasets/set", "eval.val_path": shards,
           "eval.knn_k": 5}
    assert_bit_for_bit(train_once("s3://datasets/set", tmp_path, credentials, **knn), local_state)


def test_training_through_a_connection_dropping_proxy_completes_with_nothing_skipped(
        s3, local_state, tmp_path):
    endpoint, credentials = s3
    with FlakyProxy(endpoint, drop_every=4) as proxy:
        flaky = {**credentials, "AWS_ENDPOINT_URL": proxy.url}
        assert_bit_for_bit(train_once("s3://datasets/set", tmp_path, flaky), local_state)
        assert proxy.dropped > 0, "the proxy dropped no connection: the test proved nothing"


# ---------------------------------------------------------------- errors before the first step

def start_with(data_path: str, out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(tiny_overrides(data_path, out), 1), cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    return result


def test_storage_failing_mid_run_stops_it_in_one_line_and_the_restart_resumes_exactly(
        s3, local_state, tmp_path):
    endpoint, credentials = s3
    with FlakyProxy(endpoint, drop_every=10**9) as proxy:
        process = subprocess.Popen(
            # One batch fetched ahead per loader process: steps 4-6 must read after the failure.
            train_command(s3_overrides("s3://datasets/set", tmp_path, **{"data.read_retry_s": 1,
                                                                         "data.prefetch_factor": 1}), 1),
            cwd=REPO, env={**subprocess_env(), **credentials, "AWS_ENDPOINT_URL": proxy.url,
                           "DINO_DIST_TEST_STEP_DELAY_S": "0.5"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        saved = tmp_path / "checkpoints" / "step_00000001.pt.manifest.json"
        deadline = time.monotonic() + 120
        while not saved.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proxy.drop_every = 1  # from now on every request fails
        stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 1, stdout[-2000:] + stderr[-3000:]
    errors = [line for line in (stdout + stderr).splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stdout[-2000:] + stderr[-3000:]
    assert re.search(r"reading shard 's3://datasets/set/\d{6}\.tar': gave up after \d+ attempts", errors[0])
    kept = sorted((tmp_path / "checkpoints").glob("step_*.pt"))
    assert kept and kept[-1].name < f"step_{S3_FINAL:08d}.pt"
    # The storage is back: the same command resumes and ends where an unbroken run ends.
    resumed = train_once("s3://datasets/set", tmp_path, credentials)
    for part in ("student", "teacher", "loss"):
        err, key = max_relative_error(resumed[part], local_state[part])
        assert err <= 1e-6, f"{part}.{key} differs by {err:.2e} relative"
