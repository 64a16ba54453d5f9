"""Against a real one-node SLURM (slurm/local-cluster.sh): preemption, time limits, requeue.

Each test submits a tiny CPU training, signals it the way a cluster does, and checks that
the run stopped at a step boundary with a checkpoint of that step, requeued itself, resumed
from it and logged every step exactly once. The figures for the README's closing note (seconds
from the signal to the committed checkpoint, steps lost) are printed with `-n 0 -s`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, subprocess_env, tiny_overrides, write_image_folder

CLUSTER = REPO / "slurm" / "local-cluster.sh"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="session")
def slurm():
    """The local SLURM, started (and installed, as root with apt) when needed; a loud skip
    naming the reason only when that fails."""
    started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True,
                             timeout=600)
    if started.returncode != 0 or shutil.which("sbatch") is None:
        reason = (f"SLURM TESTS SKIPPED: they need SLURM, a local one-node cluster that "
                  f"slurm/local-cluster.sh start sets up as root (apt-get, daemons); it failed: "
                  f"{started.stderr.strip()[-500:] or 'sbatch is not on PATH'}")
        warnings.warn(reason)
        print(f"\n{'!' * 20} {reason} {'!' * 20}", file=sys.stderr)
        pytest.skip(reason)


def job_state(job_id: str) -> str | None:
    out = subprocess.run(["squeue", "-j", job_id, "-t", "all", "-h", "-o", "%T"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


def wait_final(job_id: str, timeout_s: float) -> str:
    """squeue, not sacct (no accounting database) and not submitit's watcher (it uses sacct)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in FINAL:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} still {job_state(job_id)} after {timeout_s} s")


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_steps(run_dir: Path, job_id: str, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(logged_steps(run_dir)) < count:
        if time.monotonic() > deadline or job_state(job_id) in FINAL:
            subprocess.run(["scancel", job_id])
            raise AssertionError(f"job {job_id} logged {len(logged_steps(run_dir))} steps "
                                 f"(state {job_state(job_id)}); see {run_dir}")
        time.sleep(0.1)


def submit(*words: str) -> str:
    result = subprocess.run([sys.executable, "launch/submit.py", *words], cwd=REPO, text=True,
                            capture_output=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    return re.search(r"job id: (\d+)", result.stdout).group(1)


def sbatch_train(tmp_path: Path, tasks: int, overrides: list[str]) -> str:
    """The plain sbatch script (no submitit) with the demo config; the job id."""
    env = {**subprocess_env(), "DINO_PYTHON": sys.executable}
    out = subprocess.run(["sbatch", "--parsable", f"--ntasks={tasks}", "--time=10",
                          f"--output={tmp_path}/sbatch-%j.out", "slurm/train.sbatch",
                          "--config", "configs/demo.yaml", *overrides],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def stops_in_log(run_dir: Path) -> list[tuple[str, int]]:
    """(signal, step) of every 'stopped by' line rank 0 logged."""
    text = (run_dir / "log.txt").read_text()
    return [(sig, int(step)) for sig, step in re.findall(r"stopped by (\w+) at step (\d+)", text)]


def check_resumed_without_loss(run_dir: Path, stop_step: int, total_steps: int) -> None:
    log = (run_dir / "log.txt").read_text()
    assert f"resumed from {run_dir}/checkpoints/step_{stop_step:08d}.pt" in log, log[-3000:]
    assert "requeued job" in log
    # A lost step would be trained and logged twice (before the stop and after the resume).
    assert logged_steps(run_dir) == list(range(1, total_steps + 1))


def commit_seconds(run_dir: Path, stop_step: int, signalled_at: float) -> float:
    manifest = run_dir / "checkpoints" / f"step_{stop_step:08d}.pt.manifest.json"
    return manifest.stat().st_mtime - signalled_at


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", per_class=64)


def preemption_overrides(images: Path, run_dir: Path) -> list[str]:
    # 8 steps per epoch on 2 ranks, 40 steps: long enough to be signalled mid-run.
    return tiny_overrides(images, run_dir, **{"train.epochs": 5, "checkpoint.keep_last": 100})


@pytest.mark.parametrize("sig", ["USR2", "TERM"])
def test_two_task_job_saves_on_signal_requeues_and_completes(slurm, images, tmp_path, sig):
    """scancel --signal on a running 2-task job (gloo): USR2 through submitit, TERM through
    the plain sbatch script."""
    run_dir = tmp_path / "run"
    overrides = preemption_overrides(images, run_dir)
    if sig == "USR2":
        job = submit("--config", "configs/demo.yaml", "--tasks-per-node", "2",
                     "--timeout-min", "10", "--max-requeues", "3", *overrides)
    else:
        job = sbatch_train(tmp_path, 2, overrides)
    wait_for_steps(run_dir, job, 3)
    signalled_at = time.time()
    subprocess.run(["scancel", f"--signal={sig}", job], check=True)
    assert wait_final(job, 150) == "COMPLETED"

    stops = stops_in_log(run_dir)
    assert [s for s, _ in stops] == [f"SIG{sig}"], stops
    stop_step = stops[0][1]
    check_resumed_without_loss(run_dir, stop_step, 40)
    seconds = commit_seconds(run_dir, stop_step, signalled_at)
    print(f"\n{sig}: checkpoint of step {stop_step} committed {seconds:.2f} s after "
          f"scancel --signal={sig}; 0 steps lost")
    assert seconds < 30


def test_time_limit_requeues_until_done_and_matches_an_uninterrupted_run(slurm, tmp_path):
    """--timeout-min 1: SLURM's own USR2 before the limit stops, saves and requeues the run,
    as often as needed; the final checkpoint equals a run that was never stopped."""
    images = write_image_folder(tmp_path / "images", per_class=64)
    # slurmctld checks time limits every 30 s and sends USR2@N at the first check past
    # limit - N - 30 s: here 25-55 s into an allocation. 16 steps per epoch, 336 steps, each
    # stretched by a 0.15 s sleep (about 65 s in all, little of it CPU) cannot be done by
    # then. A small N also makes the next allocation, which starts ~8 s after a check, skip
    # the check at 22 s and run to ~52 s.
    extra = {"train.epochs": 21, "data.num_workers": 1, "checkpoint.keep_last": 2}
    slurm_dir, plain_dir = tmp_path / "slurm_run", tmp_path / "plain_run"
    waiting = subprocess.Popen(
        [sys.executable, "launch/submit.py", "--wait", "--config", "configs/demo.yaml",
         "--timeout-min", "1", "--signal-delay-s", "5", "--max-requeues", "30",
         *tiny_overrides(images, slurm_dir, **extra)],
        cwd=REPO, env={**subprocess_env(), "DINO_DIST_TEST_STEP_DELAY_S": "0.15"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = re.search(r"job id: (\d+)", waiting.stdout.readline()).group(1)
    plain = subprocess.Popen([sys.executable, "-m", "dino_dist.train", "--config",
                              "configs/demo.yaml", *tiny_overrides(images, plain_dir, **extra)],
                             cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    # Two allocations on an idle machine; the limits leave room for a busy one.
    assert wait_final(job, 900) == "COMPLETED"
    assert plain.wait(timeout=300) == 0, plain.stderr.read()[-3000:]
    # --wait followed the job through its requeues to the end.
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and "final state: COMPLETED" in out, out + err
    assert re.search(rf"job {job}: RUNNING\n(.*\n)*job {job}: (REQUEUED|PENDING)", out), out

    stops = stops_in_log(slurm_dir)
    assert stops and all(sig == "SIGUSR2" for sig, _ in stops), stops
    log = (slurm_dir / "log.txt").read_text()
    for _, step in stops:
        assert f"resumed from {slurm_dir}/checkpoints/step_{step:08d}.pt" in log
    assert logged_steps(slurm_dir) == list(range(1, 337))
    final = "checkpoints/step_00000336.pt"
    a = torch.load(slurm_dir / final, weights_only=True)
    b = torch.load(plain_dir / final, weights_only=True)
    for part in ("student", "teacher"):
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    assert torch.equal(a["loss"]["center"], b["loss"]["center"])
    print(f"\ntime limit: {len(stops)} stops at steps {[s for _, s in stops]}, 0 steps lost, "
          f"final checkpoint identical to the uninterrupted run")


def test_local_executor_runs_the_same_training(images, tmp_path):
    """--local: submitit's local executor, 2 tasks on this machine, no SLURM involved."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "launch/submit.py", "--local", "--wait", "--tasks-per-node", "2",
         "--config", "configs/demo.yaml", *tiny_overrides(images, run_dir, **{"train.epochs": 1})],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "final state: COMPLETED" in result.stdout
    assert f"run directory: {run_dir}" in result.stdout
    assert "rank 0 of 2" in (run_dir / "log.txt").read_text()
    assert logged_steps(run_dir) == list(range(1, 9))
    assert (run_dir / "checkpoints" / "step_00000008.pt.manifest.json").exists()


def test_plain_scancel_saves_and_is_not_requeued(slurm, images, tmp_path):
    """scancel (no --signal) sends TERM too, but the user means to end the run."""
    run_dir = tmp_path / "run"
    job = submit("--config", "configs/demo.yaml", "--timeout-min", "10",
                 *preemption_overrides(images, run_dir))
    wait_for_steps(run_dir, job, 3)
    subprocess.run(["scancel", job], check=True)
    assert wait_final(job, 60) == "CANCELLED"
    time.sleep(8)  # longer than the local cluster's requeue pause
    assert job_state(job) == "CANCELLED"
    stops = stops_in_log(run_dir)
    assert [s for s, _ in stops] == ["SIGTERM"], stops
    log = (run_dir / "log.txt").read_text()
    assert re.search(rf"not requeued \(job {job} is (COMPLETING|CANCELLED)\)", log), log[-2000:]
    assert (run_dir / "checkpoints" / f"step_{stops[0][1]:08d}.pt.manifest.json").exists()


def test_wait_follows_a_job_to_its_end_and_gives_up_on_unknown_ids(slurm, tmp_path):
    from dino_dist.cluster.submit import wait_slurm

    out = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/%j.out", "--wrap",
                          "exit 3"], capture_output=True, text=True, check=True)
    assert wait_slurm(out.stdout.strip(), poll_s=0.5) == "FAILED"
    assert wait_slurm("999999", poll_s=0.1) == "UNKNOWN to squeue"


def test_a_requeue_takes_over_its_own_lock_at_once(slurm, images, tmp_path):
    """The job's first run is SIGKILLed, so its lock stays behind (as after a node failure);
    `scontrol requeue` starts the same job again, whose run takes the lock over at once as
    its own (same job id, a later restart) and completes."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(images, run_dir, **{"train.epochs": 2, "checkpoint.every_steps": 2})
    job = sbatch_train(tmp_path, 1, overrides)
    wait_for_steps(run_dir, job, 3)
    lock = json.loads((run_dir / "owner.lock").read_text())
    assert (lock["job"], lock["restart"]) == (f"slurm:{job}", [0, 0]), lock
    os.kill(lock["pid"], signal.SIGKILL)
    assert wait_final(job, 60) == "FAILED"
    subprocess.run(["scontrol", "requeue", job], check=True)
    deadline = time.monotonic() + 30
    while job_state(job) in FINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    assert wait_final(job, 240) == "COMPLETED"
    log = (run_dir / "log.txt").read_text()
    assert (f"from host {lock['host']}, pid {lock['pid']}, job {job}, started {lock['started']}: "
            f"this job's earlier run (restart [0, 0])") in log, log[-3000:]
    assert "resumed from" in log and not (run_dir / "owner.lock").exists()
