"""Fault injection with real processes: SIGKILL at random moments (also inside a checkpoint
write), torchrun restarting a killed worker, a dead or frozen rank, a full disk."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_dist.checkpoint.directory import list_checkpoints
from dino_dist.checkpoint.reader import load_newest_valid
from tests.conftest import REPO, child_pids, free_port, run_train, subprocess_env, tiny_overrides

# 32 images, batch 8: 4 steps per epoch, 12 in all; a checkpoint after every step.
KILL_RUN = {"train.epochs": 3, "model.drop_path_rate": 0.1, "checkpoint.every_steps": 1,
            "checkpoint.keep_last": 2}


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "dino_dist.train", *overrides]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def write_in_progress(checkpoints: Path) -> bool:
    return checkpoints.is_dir() and any(p.name.endswith(".tmp") for p in checkpoints.iterdir())


def committed(checkpoints: Path) -> set[str]:
    return {p.name for p in checkpoints.glob("*.manifest.json")} if checkpoints.is_dir() else set()


def assert_same_training_state(a: dict, b: dict) -> None:
    for part in ("student", "teacher", "loss"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), f"optimizer {key}"


def test_sigkill_at_random_moments_then_restart_is_bit_exact(tmp_path, image_folder):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(tiny_overrides(image_folder, straight, **KILL_RUN))
    command = train_command(tiny_overrides(image_folder, killed, **KILL_RUN))
    env = subprocess_env()
    env["DINO_DIST_TEST_SAVE_DELAY_S"] = "0.3"  # widen each write so kills can land inside it
    rng = random.Random(0)
    # Alternate: a kill while a checkpoint file is being written, a kill at a random moment.
    plan = ["in_write", "random", "in_write", "random", "in_write"]
    kills, kills_in_write, attempts = 0, 0, 0
    while True:
        attempts += 1
        assert attempts < 20, "the run never finished"
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        moment = plan[kills] if kills < len(plan) else None
        try:
            if moment == "in_write":
                wait_for(lambda: write_in_progress(killed / "checkpoints")
                         or process.poll() is not None, 120, "a checkpoint write")
                kills_in_write += process.poll() is None
            elif moment == "random":
                # A random moment once this attempt is training (a fixed delay from the start
                # can outlast a short resumed run and kill nothing): after its first commit.
                before = committed(killed / "checkpoints")
                wait_for(lambda: committed(killed / "checkpoints") != before
                         or process.poll() is not None, 120, "a step")
                time.sleep(rng.uniform(0.0, 0.8))
        finally:
            if moment and process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
        _, stderr = process.communicate(timeout=240)
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, stderr[-3000:]
    assert kills >= 4 and kills_in_write >= 2, (kills, kills_in_write)
    final = "step_00000012.pt"
    a = torch.load(straight / "checkpoints" / final, weights_only=True)
    b = torch.load(killed / "checkpoints" / final, weights_only=True)
    assert_same_training_state(a, b)
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    print(f"kills survived: {kills} ({kills_in_write} inside a checkpoint write), mismatches: 0")


def test_torchrun_restarts_a_killed_worker_and_the_run_completes(tmp_path, image_folder):
    out = tmp_path / "run"
    overrides = tiny_overrides(image_folder, out, **{
        "train.epochs": 3, "optim.batch_size_per_gpu": 4, "checkpoint.every_steps": 1})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--max-restarts=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "dino_dist.train", *overrides]
    agent = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (out / "checkpoints" / "step_00000003.pt.manifest.json").exists(),
                 120, "step 3's checkpoint")
        victim = child_pids(agent.pid)[-1]
        os.kill(victim, signal.SIGKILL)
        output, _ = agent.communicate(timeout=240)
    finally:
        agent.kill()
    assert agent.returncode == 0, output[-4000:]
    resumed = re.search(r"resumed from \S*step_(\d{8})\.pt", output)
    assert resumed, output[-4000:]
    resumed_step = int(resumed.group(1))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
    steps = [row["step"] for row in rows]
    # First attempt: 1..m; after the restart: exactly the steps after the checkpoint, to 12.
    after = list(range(resumed_step + 1, 13))
    before = steps[:len(steps) - len(after)]
    assert steps[len(before):] == after and resumed_step >= 3
    assert before == list(range(1, len(before) + 1)) and len(before) >= resumed_step


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_frozen_or_dead_rank_makes_the_other_fail_within_the_timeout(tmp_path, image_folder, fault):
    out = tmp_path / "run"
    overrides = tiny_overrides(image_folder, out, **{
        "train.epochs": 100, "optim.batch_size_per_gpu": 4, "checkpoint.every_steps": 2,
        "train.dist_timeout_s": 5})
    env = subprocess_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    ranks = [subprocess.Popen(train_command(overrides), cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        wait_for(lambda: (out / "checkpoints" / "step_00000002.pt.manifest.json").exists(),
                 120, "the first checkpoint")
        ranks[1].send_signal(getattr(signal, fault))
        started = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=60)
        waited = time.monotonic() - started
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert ranks[0].returncode == 1, stderr[-3000:]
    assert waited < 5 + 15, waited  # the timeout plus the step in flight, not forever
    assert "dino-train: error: rank 0: a collective failed" in stderr
    assert "train.dist_timeout_s=5" in stderr and "Traceback" not in stderr
    path, _ = load_newest_valid(out / "checkpoints")
    assert path is not None  # the work saved so far is intact


@pytest.fixture
def small_disk(tmp_path):
    """A real, tiny file system (tmpfs) that fills up; skipped where mounting is not allowed."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()

    def mount(size_bytes: int) -> Path:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                                 str(mount_point)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): "
                        f"the disk-full test needs root and mount rights")
        return mount_point

    yield mount
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_disk_full_is_a_clear_error_and_the_previous_checkpoint_survives(
        tmp_path, image_folder, small_disk):
    probe = tmp_path / "probe"
    run_train(tiny_overrides(image_folder, probe, **{"train.max_steps": 1}))
    size = (probe / "checkpoints" / "step_00000001.pt").stat().st_size
    out = small_disk(int(size * 1.6) + 256 * 1024) / "run"  # room for one checkpoint, not two
    result = run_train(tiny_overrides(image_folder, out, **{
        "train.max_steps": 4, "checkpoint.every_steps": 1}), check=False)
    assert result.returncode == 1
    message = result.stdout + result.stderr
    assert "cannot write checkpoint" in message and "No space left on device" in message
    assert "earlier checkpoints are kept" in message and "Traceback" not in message
    path, state = load_newest_valid(out / "checkpoints")
    assert path.name == "step_00000001.pt" and state["step"] == 1
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000001.pt"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_unwritable_output_dir_is_a_one_line_error(tmp_path, image_folder):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_train(tiny_overrides(image_folder, blocker / "run"), check=False)
    assert result.returncode == 1
    assert f"train.output_dir '{blocker / 'run'}' is not writable" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
