"""One run directory, one writer, with real processes and signals: workers die with their
torchrun agent, a second run on a live directory is refused without touching it, and locks
whose owner is gone (killed, on a host that left, an earlier run of the same job) are taken
over by themselves."""
from __future__ import annotations

import contextlib
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

from dino_dist.checkpoint.run_lock import LOCK_NAME, STALE_AFTER_S, Owner, gone_reason
from tests.conftest import (REPO, child_pids, free_port, kill_pids, max_relative_error,
                            run_train, state_at, subprocess_env, tiny_overrides,
                            write_image_folder)

# 32 images, 2 ranks x 4: 4 steps an epoch, 8 in all; a checkpoint after every step.
RUN = {"train.epochs": 2, "optim.batch_size_per_gpu": 4, "checkpoint.every_steps": 1,
       "checkpoint.keep_last": 2}
FINAL = 8
MODES = {"ddp": {}, "fsdp": {"train.parallel": "fsdp", "checkpoint.async_save": True}}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("one_writer") / "images")


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory):
    """The final state of an uninterrupted run, per mode (made once, shared by the tests)."""
    finals = {}

    def final_state(mode: str) -> dict:
        if mode not in finals:
            out = tmp_path_factory.mktemp(f"straight_{mode}")
            run_train(tiny_overrides(images, out, **RUN, **MODES[mode]), nproc=2)
            finals[mode] = state_at(out, FINAL)
        return finals[mode]
    return final_state


def torchrun_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            "-m", "dino_dist.train", *overrides]


def start(command: list[str], **env) -> subprocess.Popen:
    """In a session of its own, so a test can kill the whole tree when it must."""
    return subprocess.Popen(command, cwd=REPO, env={**subprocess_env(), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped has stopped: it holds nothing but its pid)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def committed(checkpoints: Path) -> list[str]:
    if not checkpoints.is_dir():
        return []
    return sorted(p.name for p in checkpoints.iterdir() if p.name.endswith(".manifest.json")
                  or (p / "COMMITTED.json").exists())


def save_in_flight(checkpoints: Path) -> bool:
    """A `.tmp` being written, or a shard folder without its commit marker yet."""
    return checkpoints.is_dir() and any(
        p.name.endswith(".tmp") or (p.is_dir() and not (p / "COMMITTED.json").exists()
                                    and any(q.name.endswith(".tmp") for q in p.iterdir()))
        for p in checkpoints.iterdir())


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under a directory with its size and modification time."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_state(a: dict, b: dict) -> None:
    for part in ("student", "teacher", "loss"):
        err, key = max_relative_error(a[part], b[part])
        assert err < 1e-6, f"{part}.{key} differs by {err:.2e} relative"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_sigkill_of_the_torchrun_agent_stops_its_workers_and_the_run_resumes_exactly(
        mode, images, straight, tmp_path):
    common = {**RUN, **MODES[mode]}
    out = tmp_path / "killed"
    overrides = tiny_overrides(images, out, **common)
    rng = random.Random(mode)
    # Each step is stretched (with async saves a step is otherwise quicker than the random
    # wait below), so every kill lands in a run that is still training and owns its lock.
    slow = {"DINO_DIST_TEST_SAVE_DELAY_S": "0.5", "DINO_DIST_TEST_STEP_DELAY_S": "0.5"}
    for moment in ("start-up", "a save in flight", "a random moment"):
        agent = start(torchrun_command(overrides), **slow)
        workers: list[int] = []
        try:
            workers = kill_agent_at(moment, agent, out / "checkpoints", rng)
            wait_for(lambda: not any(alive(pid) for pid in workers), 15,
                     f"the workers {workers} to stop after the agent was killed at {moment}")
        finally:
            kill_pids([agent.pid, *workers, *child_pids(agent.pid)])
        left = committed(out / "checkpoints")
        time.sleep(2)
        assert committed(out / "checkpoints") == left, f"a checkpoint appeared after {moment}"
        assert "its launcher" in agent.stdout.read() or moment == "start-up"
    # Rank 0 either died holding the lock (SIGKILL-like) or ended through the error its lost
    # peer raised, releasing it after its last write: both are right; a lock left behind is
    # taken over, and said so.
    lock_left = (out / LOCK_NAME).exists()
    result = run_train(overrides, nproc=2)
    assert "resumed from" in result.stdout
    assert ("its process is dead" in result.stdout) == lock_left, result.stdout
    assert_same_state(state_at(out, FINAL), straight(mode))
    assert not (out / LOCK_NAME).exists()


def kill_agent_at(moment: str, agent: subprocess.Popen, checkpoints: Path,
                  rng: random.Random) -> list[int]:
    """SIGKILL the agent alone at the moment named; the pids of its workers."""
    wait_for(lambda: len(child_pids(agent.pid)) == 2 or agent.poll() is not None, 120,
             "torchrun to start its workers")
    workers = child_pids(agent.pid)
    if moment == "start-up":
        time.sleep(rng.uniform(0.0, 2.0))  # inside the imports or the rendezvous
    elif moment == "a save in flight":
        wait_for(lambda: save_in_flight(checkpoints) or agent.poll() is not None, 120,
                 "a save in flight")
    else:
        before = committed(checkpoints)
        wait_for(lambda: committed(checkpoints) != before or agent.poll() is not None, 120,
                 "a first commit of this attempt")
        time.sleep(rng.uniform(0.0, 1.0))
    assert agent.poll() is None, f"the run ended before {moment}:\n{agent.stdout.read()}"
    if moment != "start-up":  # the kill lands in a run that owns the directory
        assert (checkpoints.parent / LOCK_NAME).exists()
    os.kill(agent.pid, signal.SIGKILL)
    return workers


def test_a_second_run_on_a_live_directory_is_refused_and_changes_nothing(images, straight,
                                                                         tmp_path):
    """The live run is frozen (SIGSTOP, its agent and its workers, which torchrun starts in
    sessions of their own) while a save of its is in flight, so the directory cannot change
    under the comparison; both a plain and a torchrun second run refuse."""
    common = {**RUN, **MODES["fsdp"]}
    out = tmp_path / "live"
    overrides = tiny_overrides(images, out, **common)
    live = start(torchrun_command(overrides), DINO_DIST_TEST_SAVE_DELAY_S="0.5")
    try:
        wait_for(lambda: save_in_flight(out / "checkpoints") or live.poll() is not None, 120,
                 "a save in flight")
        frozen = [live.pid, *child_pids(live.pid)]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        before = snapshot(out)
        plain = subprocess.run([sys.executable, "-m", "dino_dist.train", *overrides], cwd=REPO,
                               env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert plain.returncode == 2, plain.stdout + plain.stderr
        line, = plain.stderr.strip().splitlines()
        assert line.startswith(f"dino-train: error: train.output_dir '{out}' is in use by a "
                               f"live run (host ") and "choose another train.output_dir" in line
        ranks = subprocess.run(torchrun_command(overrides), cwd=REPO, env=subprocess_env(),
                               capture_output=True, text=True, timeout=120)
        assert ranks.returncode != 0 and "is in use by a live run" in ranks.stderr
        assert snapshot(out) == before
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        output, _ = live.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already when all went well
            for pid in [live.pid, *child_pids(live.pid)]:
                os.kill(pid, signal.SIGCONT)
            os.killpg(live.pid, signal.SIGKILL)
    assert live.returncode == 0, output[-3000:]
    assert "removed" not in output and "took over" not in output
    assert_same_state(state_at(out, FINAL), straight("fsdp"))


def test_after_a_whole_tree_sigkill_the_same_command_resumes_by_itself(images, tmp_path):
    overrides = tiny_overrides(images, tmp_path, **RUN)
    run = start(torchrun_command(overrides))
    try:
        wait_for(lambda: committed(tmp_path / "checkpoints") or run.poll() is not None, 120,
                 "a first checkpoint")
        assert (tmp_path / LOCK_NAME).exists()
    finally:
        kill_pids([run.pid, *child_pids(run.pid)])  # every process of the run at once
        run.wait()
    result = run_train(overrides, nproc=2)
    assert "took over" in result.stdout and "its process is dead" in result.stdout
    assert "resumed from" in result.stdout
    assert not (tmp_path / LOCK_NAME).exists()


def other_hosts_lock(directory: Path, age_s: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    owner = Owner("node-elsewhere", 4242, "123", "slurm:900", (0, 0), "2026-01-01 00:00:00 UTC")
    path = directory / LOCK_NAME
    path.write_text(json.dumps({**owner.__dict__, "restart": list(owner.restart)}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_another_hosts_lock_is_taken_over_only_after_its_keep_alive_expires(images, tmp_path):
    overrides = tiny_overrides(images, tmp_path, **{"train.max_steps": 1})
    other_hosts_lock(tmp_path, age_s=STALE_AFTER_S - 30)
    refused = run_train(overrides, check=False)
    assert refused.returncode == 2
    assert "in use by a live run (host node-elsewhere, pid 4242, job 900" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing else written
    other_hosts_lock(tmp_path, age_s=STALE_AFTER_S + 30)
    taken = run_train(overrides)
    assert re.search(r"took over .* from host node-elsewhere, pid 4242, job 900, .*: its "
                     r"keep-alive is \d+ s old", taken.stdout), taken.stdout[-2000:]
    assert not (tmp_path / LOCK_NAME).exists()


def test_when_an_owner_counts_as_gone(tmp_path):
    me = Owner("here", os.getpid(), "", "slurm:7", (1, 0), "now")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        from dino_dist.checkpoint.run_lock import pid_start_time
        live = Owner("here", sleeper.pid, pid_start_time(sleeper.pid), "", (0, 0), "then")
        assert gone_reason(live, 1e6, me) is None  # same host, live pid: never stale by age
        reused = Owner("here", sleeper.pid, "1", "", (0, 0), "then")  # the pid is another's now
        assert gone_reason(reused, 0, me) == "its process is dead"
        requeued = Owner("other", sleeper.pid, "", "slurm:7", (0, 0), "then")
        assert gone_reason(requeued, 0, me) == "this job's earlier run (restart [0, 0])"
        same_restart = Owner("other", 1, "", "slurm:7", (1, 0), "then")
        assert gone_reason(same_restart, 0, me) is None
        assert gone_reason(same_restart, STALE_AFTER_S + 1, me).startswith("its keep-alive")
    finally:
        sleeper.kill()
        sleeper.wait()
    dead = Owner("here", sleeper.pid, "", "", (0, 0), "then")
    assert gone_reason(dead, 0, me) == "its process is dead"


@pytest.mark.parametrize("hard_links", [True, False])
def test_the_lock_is_taken_once_refused_while_held_and_gone_after_release(
        hard_links, tmp_path, monkeypatch):
    """Also on a file system without hard links (some FUSE mounts), where the lock file is
    created in place instead."""
    from dino_dist.checkpoint.run_lock import RunLock
    from dino_dist.errors import RunDirectoryBusy

    if not hard_links:
        def no_links(*_):
            raise PermissionError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)
    held = RunLock(tmp_path / "run").acquire()
    assert held.owned() and held.takeover is None
    with pytest.raises(RunDirectoryBusy, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "run").acquire()
    held.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
    again = RunLock(tmp_path / "run").acquire()
    assert again.owned()
    again.release()
