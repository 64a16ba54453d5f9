"""Rendezvous from SLURM's variables, and the submission's option handling.

No SLURM needed; where scontrol is installed, the node-list reading is checked against it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from dino_dist.config import load_config
from dino_dist.distributed.slurm_env import (PORT_BASE, PORT_SPAN, expand_hostlist, first_node,
                                             port_for_job, slurm_rendezvous)
from dino_dist.cli.submit import parse_args, submit
from dino_dist.cluster.submit import resolve_config, slurm_parameters
from tests.conftest import REPO, subprocess_env


# Node lists as SLURM_JOB_NODELIST carries them on real clusters, and their hosts in order.
HOSTLISTS = [
    ("vm", ["vm"]),
    ("127.0.0.1", ["127.0.0.1"]),
    ("gpu[07-09,12]", ["gpu07", "gpu08", "gpu09", "gpu12"]),
    ("gpu[12,3-4]", ["gpu12", "gpu3", "gpu4"]),  # as written, not sorted
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # the first number's width holds
    ("nid[001234-001236]", ["nid001234", "nid001235", "nid001236"]),
    ("a[1,3-5],b7", ["a1", "a3", "a4", "a5", "b7"]),
    ("node-a1,node-b[1-2]", ["node-a1", "node-b1", "node-b2"]),
    ("dgx-h100-[07-08],login01", ["dgx-h100-07", "dgx-h100-08", "login01"]),
    ("rack1-n[001-003],rack2-n[001-002]",
     ["rack1-n001", "rack1-n002", "rack1-n003", "rack2-n001", "rack2-n002"]),
    ("rack[1-2]-node[01-04]", [f"rack{r}-node0{n}" for r in (1, 2) for n in range(1, 5)]),
    ("cn[1-2][3-4]", ["cn13", "cn14", "cn23", "cn24"]),
    ("node-[001-004]-ib", ["node-001-ib", "node-002-ib", "node-003-ib", "node-004-ib"]),
    ("gpu[1-2]-ib,gpu[10,12]-ib", ["gpu1-ib", "gpu2-ib", "gpu10-ib", "gpu12-ib"]),
]

# What SLURM itself refuses ('Invalid hostlist'); a rendezvous must not guess at them.
MALFORMED = ["a[3-1]", "a[]", "a[x]", "a[1,,2]", "a[[1]]", "a[1-2]]", "a[-1]"]


@pytest.mark.parametrize("nodelist, hosts", HOSTLISTS)
def test_node_lists_expand_in_slurm_order(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts
    assert first_node(nodelist) == hosts[0]


# 'a[1-2' and 'a[1-]' SLURM reads its own way ('a]', 'a1'); '' names no host at all.
@pytest.mark.parametrize("nodelist", MALFORMED + ["a[1-2", "a]", "a[1-]", "", " , "])
def test_malformed_node_lists_are_refused(nodelist):
    with pytest.raises(ValueError, match="cannot read SLURM node list"):
        first_node(nodelist)


def test_a_malformed_tail_is_refused_though_the_first_host_reads():
    with pytest.raises(ValueError, match="'5-4'"):
        first_node("gpu[01-02],gpu[5-4]")


def test_a_runaway_range_is_refused_before_it_fills_memory():
    with pytest.raises(ValueError, match="more than"):
        first_node("n[0-999999999]")


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory):
    """`scontrol show hostnames` as a function: SLURM's own reading of a node list."""
    if shutil.which("scontrol") is None:
        pytest.skip("needs SLURM's scontrol on PATH (Debian: slurm-client; "
                    "slurm/local-cluster.sh start installs it) to compare with SLURM's reading")
    # scontrol reads a config before any command, even one that asks no daemon; a throwaway
    # one works on machines with no SLURM set up and never reaches a real cluster's controller.
    conf = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\n")

    def hostnames(nodelist: str) -> list[str] | None:
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], text=True,
                                capture_output=True, timeout=60,
                                env={**os.environ, "SLURM_CONF": str(conf)})
        if "Invalid hostlist" in result.stderr:
            return None  # scontrol exits 0 even then
        assert result.returncode == 0, result.stderr
        return result.stdout.split()
    return hostnames


def test_expansions_agree_with_scontrol(scontrol):
    """Every form SLURM reads expands the same here. Text after a bracket group
    ('node-[001-004]-ib') is refused by some SLURM versions (22.05 among them): only those
    forms may be refused, and where they are, the table above is the reference."""
    refused = []
    for nodelist, hosts in HOSTLISTS:
        theirs = scontrol(nodelist)
        if theirs is None:
            refused.append(nodelist)
        else:
            assert expand_hostlist(nodelist) == theirs, nodelist
    assert all(re.search(r"\][^\[,]", nodelist) for nodelist in refused), refused
    assert len(refused) < len(HOSTLISTS)


def test_what_scontrol_refuses_is_refused_here(scontrol):
    for nodelist in MALFORMED:
        assert scontrol(nodelist) is None, nodelist
        with pytest.raises(ValueError):
            expand_hostlist(nodelist)


def test_port_is_stable_for_a_job_and_differs_between_jobs():
    assert port_for_job("123456") == port_for_job(123456)
    assert port_for_job("123456") != port_for_job("123457")
    ports = {port_for_job(j) for j in range(1, 50_000, 7)}
    assert min(ports) >= PORT_BASE and max(ports) < PORT_BASE + PORT_SPAN < 32768


def test_rendezvous_only_inside_a_slurm_task(monkeypatch):
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_rendezvous() is None
    monkeypatch.setenv("SLURM_JOB_NODELIST", "rack[1-2]-cn[10-11]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert slurm_rendezvous() is None  # the batch shell, not a task started by srun
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert slurm_rendezvous() == ("rack1-cn10", port_for_job(4242))


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
    (["--timeout-min", "1", "--signal-delay-s", "60"],
     "slurm.signal_delay_s=60 (--signal-delay-s) is not shorter than slurm.timeout_min=1"),
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
