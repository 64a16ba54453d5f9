"""Signal → stop flag → checkpoint at the step boundary → exit 75 → resume, without SLURM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dino_dist.cluster.requeue import EXIT_STOPPED, requeue_decision
from dino_dist.distributed.stop import install_stop_handlers
from dino_dist.distributed.stop import STOP_REQUEST
from tests.conftest import REPO, run_train, subprocess_env, tiny_overrides


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    STOP_REQUEST.clear()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    STOP_REQUEST.clear()


def test_handlers_only_set_the_flag(restore_handlers):
    install_stop_handlers(include_term=True)
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR2)
    assert STOP_REQUEST.requested and STOP_REQUEST.reason == "SIGTERM"  # the first one wins


def test_term_is_left_alone_outside_a_scheduler(restore_handlers):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    install_stop_handlers(include_term=False)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    os.kill(os.getpid(), signal.SIGUSR2)
    assert STOP_REQUEST.reason == "SIGUSR2"


@pytest.mark.parametrize("job, restarts, state, why_not", [
    ("7", 0, "RUNNING", None),
    ("7", 2, "RUNNING", None),
    ("7", 3, "RUNNING", "already requeued 3 times (slurm.max_requeues=3)"),
    ("7", 0, "COMPLETING", "job 7 is COMPLETING"),  # a plain scancel: the user ends the run
    ("7", 0, "CANCELLED", "job 7 is CANCELLED"),
    (None, 0, None, "not a SLURM job"),
])
def test_requeue_decision(job, restarts, state, why_not):
    assert requeue_decision(job, restarts, 3, state) == why_not


def logged_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_usr2_stops_a_plain_run_at_a_step_boundary_and_a_restart_loses_nothing(image_folder,
                                                                               tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(image_folder, run_dir, **{"train.epochs": 12})  # 4 steps/epoch
    proc = subprocess.Popen([sys.executable, "-m", "dino_dist.train", *overrides], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or len(logged_steps(run_dir)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_STOPPED, output
    stopped = logged_steps(run_dir)[-1]
    assert stopped < 48, "the run finished before the signal: make it longer"
    assert (run_dir / "checkpoints" / f"step_{stopped:08d}.pt.manifest.json").exists()
    assert f"stopped by SIGUSR2 at step {stopped}" in output
    assert "not requeued (not a SLURM job)" in output

    run_train(overrides)
    assert logged_steps(run_dir) == list(range(1, 49))  # none lost, none repeated


def test_a_signal_during_start_up_stops_at_the_first_step(image_folder, tmp_path):
    """The SLURM entry installs the handlers before torch is imported."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dino_dist.cli.slurm_entry",
                             *tiny_overrides(image_folder, run_dir)], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # the handlers are in place within ~0.1 s; torch takes seconds to import
    proc.send_signal(signal.SIGUSR2)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_STOPPED, output
    assert "stopped by SIGUSR2 at step 1" in output
    assert logged_steps(run_dir) == [1]
