"""Rendezvous from SLURM's variables, and the submission's option handling (no SLURM needed)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dino_dist.config import load_config
from dino_dist.distributed.slurm_env import PORT_BASE, PORT_SPAN, first_node, port_for_job, slurm_rendezvous
from dino_dist.cli.submit import parse_args, submit
from dino_dist.cluster.submit import resolve_config, slurm_parameters
from tests.conftest import REPO, subprocess_env


@pytest.mark.parametrize("nodelist, first", [
    ("vm", "vm"),
    ("gpu[07-09,12]", "gpu07"),
    ("gpu[12,3-4]", "gpu12"),
    ("node-a1,node-b[1-2]", "node-a1"),
    ("rack1-n[001-128],rack2-n[001-004]", "rack1-n001"),
])
def test_first_node_of_compressed_node_lists(nodelist, first):
    assert first_node(nodelist) == first


def test_port_is_stable_for_a_job_and_differs_between_jobs():
    assert port_for_job("123456") == port_for_job(123456)
    assert port_for_job("123456") != port_for_job("123457")
    ports = {port_for_job(j) for j in range(1, 50_000, 7)}
    assert min(ports) >= PORT_BASE and max(ports) < PORT_BASE + PORT_SPAN < 32768


def test_rendezvous_only_inside_a_slurm_task(monkeypatch):
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_rendezvous() is None
    monkeypatch.setenv("SLURM_JOB_NODELIST", "cn[10-11]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert slurm_rendezvous() is None  # the batch shell, not a task started by srun
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert slurm_rendezvous() == ("cn10", port_for_job(4242))


def test_two_slurm_style_tasks_meet_without_master_variables(tmp_path):
    """Two processes with only SLURM's variables form a gloo group (no torchrun, no file)."""
    script = ("import torch, dino_dist.distributed.env as d, dino_dist.distributed.collectives as c;"
              "env = d.init_distributed('cpu');"
              "t = torch.ones(1); c.all_reduce_sum_(t); print(env.rank, int(t.item()));"
              "d.teardown()")
    env = subprocess_env()
    env.update(SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID=str(os.getpid() % 10_000 + 7),
               SLURM_NTASKS="2")
    env.pop("MASTER_PORT", None)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, text=True,
                              env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(o[0].strip() for o in outs) == ["0 2", "1 2"]


def submit_args(*words: str):
    return parse_args(["--config", str(REPO / "configs" / "demo.yaml"), *words])


def test_options_override_the_config_slurm_section(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text()
                      + "slurm:\n  partition: from_yaml\n  qos: high\n  gpus_per_node: 4\n")
    args = parse_args(["--config", str(config), "--partition", "from_cli", "--timeout-min", "30"])
    cfg, words = resolve_config(str(config), args)
    assert (cfg.slurm.partition, cfg.slurm.qos, cfg.slurm.timeout_min) == ("from_cli", "high", 30)
    assert cfg.slurm.tasks_per_node == 4  # one task per GPU by default
    assert words == ["slurm.partition=from_cli", "slurm.timeout_min=30"]
    params = slurm_parameters(cfg.slurm)
    assert params["slurm_partition"] == "from_cli" and params["slurm_qos"] == "high"
    assert params["gpus_per_node"] == 4 and params["tasks_per_node"] == 4


def test_nothing_about_a_cluster_is_sent_unless_asked():
    cfg, _ = resolve_config(str(REPO / "configs" / "demo.yaml"), submit_args())
    params = slurm_parameters(cfg.slurm)
    assert not {"slurm_partition", "slurm_account", "slurm_qos", "slurm_constraint",
                "gpus_per_node", "cpus_per_task", "mem_gb"} & set(params)
    assert params["tasks_per_node"] == 1 and params["slurm_additional_parameters"] == {"requeue": True}


@pytest.mark.parametrize("words, message", [
    (["--timeout-min", "1", "--signal-delay-s", "60"], "--signal-delay-s 60 is not shorter"),
    (["slurm.partiton=x"], "did you mean 'slurm.partition'"),
    (["--local", "--nodes", "2"], "--local runs on this machine only"),
])
def test_bad_submissions_get_one_line(words, message, tmp_path, capsys):
    config = str(REPO / "configs" / "demo.yaml")
    assert submit(["--config", config, f"train.output_dir={tmp_path}", *words]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_missing_sbatch_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it: no sbatch
    assert submit([f"train.output_dir={tmp_path}"]) == 2
    assert "sbatch not found" in capsys.readouterr().err


def test_slurm_section_is_validated():
    with pytest.raises(ValueError, match="slurm.nodes"):
        load_config(None, ["slurm.nodes=0"])
