"""What a SLURM job tells its tasks through the environment, as plain values.

The rendezvous needs no shared file: every task of a job sees the same node list and job id,
so each can compute the same master address (the first node) and port (from the job id) on
its own, and a requeued job (same id, maybe other nodes) computes them again on start.
"""
from __future__ import annotations

import os
import re

# Below Linux's ephemeral range (32768+), so an outgoing connection cannot hold the port;
# jobs whose ids differ by less than the span never collide on a shared node.
PORT_BASE = 15000
PORT_SPAN = 15000

_GROUP = re.compile(r"([^,\[]+)(?:\[([^\]]+)\])?")


def first_node(nodelist: str) -> str:
    """First host of a compressed SLURM node list: 'gpu[07-09,12],cpu1' → 'gpu07'."""
    match = _GROUP.match(nodelist.strip())
    if not match or not match.group(1):
        raise ValueError(f"cannot read SLURM_JOB_NODELIST '{nodelist}'")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first  # zero padding is part of the text ('07'), so it is kept


def port_for_job(job_id: str | int) -> int:
    digits = re.sub(r"\D", "", str(job_id))  # submitit writes array tasks as 1234_5
    if not digits:
        raise ValueError(f"cannot derive a port from SLURM job id '{job_id}'")
    return PORT_BASE + int(digits) % PORT_SPAN


def slurm_job_id() -> str | None:
    """The job id (each array task has its own); None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_restart_count() -> int:
    """How many times this job was requeued; SLURM leaves it unset on the first run."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def slurm_rendezvous() -> tuple[str, int] | None:
    """(master address, port) for a multi-task SLURM job, or None outside one."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    job_id = slurm_job_id()
    if not nodelist or not job_id or "SLURM_PROCID" not in os.environ:
        return None
    return first_node(nodelist), port_for_job(job_id)


def under_slurm() -> bool:
    return slurm_job_id() is not None
