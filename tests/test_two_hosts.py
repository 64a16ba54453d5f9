"""Two hosts joined by a real network (namespaces + veth, see tests/two_hosts.py).

What each test proves:
- 2 hosts x 1 process, batch B/2 == 1 process, batch B: global ranks, the global data shard and
  the center reduction are right across a network, not only across loopback.
- 2 hosts x 2 processes: runs to the end and only global rank 0 writes the run directory
  (host B runs in another working directory with a relative output_dir: anything a rank of
  host B wrote would appear there).
- Elastic c10d rendezvous, then SIGKILL of host B: host A re-rendezvouses alone, resumes at the
  smaller world size from the newest checkpoint and finishes; the interrupted epoch is neither
  repeated nor cut.
- An agent that cannot reach the rendezvous store fails within its timeout naming the address.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (EQUIVALENCE_SEED, max_relative_error, run_train, tiny_overrides,
                            write_image_folder)
from tests.two_hosts import NamespacesUnavailable, TwoHosts

STEPS, BATCH = 6, 8
IMAGES = 64  # the module's dataset: 4 classes x 16
_created = [0]


@pytest.fixture
def two_hosts():
    _created[0] += 1
    tag = f"{os.getpid() % 1000}{_created[0]}"
    try:
        pair = TwoHosts.create(tag, subnet=100 + (os.getpid() + _created[0]) % 150)
    except NamespacesUnavailable as err:
        pytest.skip(f"two-host tests need network namespaces (root and 'ip netns'): {err}")
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("hosts") / "images", classes=4, per_class=16)


def static_args(pair: TwoHosts, node_rank: int, nproc: int, port: int) -> list[str]:
    return ["--nnodes=2", f"--nproc_per_node={nproc}", f"--node_rank={node_rank}",
            f"--master-addr={pair.hosts[0].address}", f"--master-port={port}"]


def wait_all(processes, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in processes]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_two_hosts_half_batch_equal_one_process_full_batch(two_hosts, dataset, tmp_path):
    reference, spread = tmp_path / "reference", tmp_path / "two_hosts"
    training = {"train.max_steps": STEPS, "train.seed": EQUIVALENCE_SEED}
    run_train(tiny_overrides(dataset, reference, **training))
    train_args = tiny_overrides(dataset, spread, **{
        **training, "optim.batch_size_per_gpu": BATCH // 2})
    agents = [two_hosts.torchrun(host, static_args(two_hosts, rank, 1, 29510), train_args,
                                 log=tmp_path / f"host{rank}.log")
              for rank, host in enumerate(two_hosts.hosts)]
    assert wait_all(agents, 240) == [0, 0], (tmp_path / "host0.log").read_text()[-3000:]
    name = f"step_{STEPS:08d}.pt"
    ref = torch.load(reference / "checkpoints" / name, weights_only=True)
    got = torch.load(spread / "checkpoints" / name, weights_only=True)
    assert got["world_size"] == 2
    for part in ("student", "teacher", "loss"):
        err, key = max_relative_error(got[part], ref[part])
        assert err < 1e-5, f"{part}.{key} differs by {err:.2e} relative"


def test_two_hosts_two_processes_each_only_global_rank_0_writes(two_hosts, dataset, tmp_path):
    workdirs = [tmp_path / "host_a", tmp_path / "host_b"]
    train_args = tiny_overrides(dataset, Path("run"), **{
        "train.epochs": 2, "optim.batch_size_per_gpu": 2, "log.tensorboard": True})
    agents = []
    for rank, (host, workdir) in enumerate(zip(two_hosts.hosts, workdirs)):
        workdir.mkdir()
        agents.append(two_hosts.torchrun(host, static_args(two_hosts, rank, 2, 29511),
                                         train_args, cwd=workdir, log=tmp_path / f"h{rank}.log"))
    assert wait_all(agents, 240) == [0, 0], (tmp_path / "h0.log").read_text()[-3000:]
    run_a = workdirs[0] / "run"
    assert sorted(p.name for p in run_a.iterdir()) == [
        "checkpoints", "config.yaml", "log.txt", "metrics.jsonl", "tb", "training_summary.json"]
    assert [r["step"] for r in metrics(run_a)] == list(range(1, 2 * IMAGES // 8 + 1))
    assert "rank 0 of 4" in (run_a / "log.txt").read_text()
    assert list(workdirs[1].iterdir()) == []  # host B's ranks (its local rank 0 too) wrote nothing


def test_losing_a_host_mid_run_the_other_continues_and_finishes(two_hosts, dataset, tmp_path):
    run_dir = tmp_path / "run"
    train_args = tiny_overrides(dataset, run_dir, **{
        "train.epochs": 2, "optim.batch_size_per_gpu": 4, "checkpoint.every_steps": 1})
    agents = []
    for rank, host in enumerate(two_hosts.hosts):
        elastic = ["--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=2",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint={two_hosts.hosts[0].address}:29512",
                   "--rdzv-id=lose_a_host",
                   f"--rdzv-conf=is_host={str(rank == 0).lower()},last_call_timeout=3",
                   f"--local-addr={host.address}"]
        agents.append(two_hosts.torchrun(host, elastic, train_args, log=tmp_path / f"h{rank}.log"))
    # 2 ranks x 4 = 8 images per step, 8 steps per epoch: kill host B inside epoch 1.
    marker = run_dir / "checkpoints" / "step_00000011.pt.manifest.json"
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert time.monotonic() < deadline and agents[0].poll() is None, "no step 11 checkpoint"
        time.sleep(0.01)
    two_hosts.kill_host(two_hosts.hosts[1])
    assert agents[0].wait(timeout=240) == 0, (tmp_path / "h0.log").read_text()[-4000:]

    log = (run_dir / "log.txt").read_text()
    assert "rank 0 of 2" in log and "rank 0 of 1" in log
    assert "resuming on 1 processes a checkpoint written by 2: total batch 8 -> 4" in log
    resumed_step = int(re.search(r"resumed from \S*step_(\d{8})\.pt", log).group(1))
    rows = metrics(run_dir)
    steps = [r["step"] for r in rows]
    after = list(range(resumed_step + 1, steps[-1] + 1))  # the restarted run's rows
    before = rows[:len(rows) - len(after)]
    assert steps[len(before):] == after and resumed_step >= 11
    assert steps[:len(before)] == list(range(1, len(before) + 1))
    # Epoch 1 as it happened: 8 images per step up to the checkpoint, then 4 per step.
    kept = [r for r in before if r["step"] <= resumed_step] + rows[len(before):]
    epoch_1 = [r["epoch_samples"] for r in kept if r["epoch"] == 1]
    consumed_before = (resumed_step - 8) * 8
    assert epoch_1 == list(range(8, consumed_before + 1, 8)) + list(
        range(consumed_before + 4, IMAGES + 1, 4))  # ends exactly at the 64 images


def test_agent_that_cannot_reach_the_store_fails_naming_the_address(two_hosts, dataset, tmp_path):
    host_a, host_b = two_hosts.hosts  # nothing listens on host A
    args = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={host_a.address}:29513", "--rdzv-id=nobody_home",
            "--rdzv-conf=is_host=false,join_timeout=10,read_timeout=10",
            f"--local-addr={host_b.address}"]
    started = time.monotonic()
    agent = two_hosts.torchrun(host_b, args, tiny_overrides(dataset, tmp_path / "run"),
                               log=tmp_path / "agent.log")
    assert agent.wait(timeout=120) != 0
    waited = time.monotonic() - started
    output = (tmp_path / "agent.log").read_text()
    assert f"({host_a.address}, 29513)" in output or f"{host_a.address}:29513" in output
    assert waited < 10 * 2 + 30, waited  # its two connection tries, plus start-up
    assert not (tmp_path / "run").exists()
