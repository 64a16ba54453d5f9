"""After a stop (SLURM time limit, preemption): requeue the job, or say why not.

The signal handlers (`dino_dist.distributed.stop`) only set a flag; the training loop folds it
into its per-step reduction, so all ranks stop at the same step boundary and rank 0 commits a
checkpoint there. Only then, with every rank out of the loop, does rank 0 ask SLURM to requeue
the job here. The requeued job resumes from the newest valid checkpoint in
`train.output_dir` by itself, so no step is lost.
"""
from __future__ import annotations

import logging
import os
import subprocess

from dino_dist.distributed.slurm_env import slurm_job_id, slurm_restart_count

LOG = logging.getLogger("dino_dist")

# sysexits' EX_TEMPFAIL: stopped early with a checkpoint saved; running again continues.
EXIT_STOPPED = 75
# The code submitit's local executor reads as "run the tasks again" (a local requeue).
EXIT_LOCAL_REQUEUE = 144
# SLURM states from which a requeue continues the run. A CANCELLED job also gets a SIGTERM
# (from scancel), and requeueing it would bring back a run the user meant to end.
REQUEUEABLE_STATES = ("RUNNING", "TIMEOUT")


def job_state(job_id: str) -> str | None:
    """SLURM's state of the job ('RUNNING', 'CANCELLED', ...), None when squeue cannot tell."""
    try:
        out = subprocess.run(["squeue", "-j", job_id, "-t", "all", "-h", "-o", "%T"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def requeue_decision(job_id: str | None, restarts: int, max_requeues: int,
                     state: str | None) -> str | None:
    """Why the job must not be requeued, or None when it should be."""
    if job_id is None:
        return "not a SLURM job"
    if restarts >= max_requeues:
        return f"already requeued {restarts} times (slurm.max_requeues={max_requeues})"
    if state is not None and state not in REQUEUEABLE_STATES:
        return f"job {job_id} is {state}"
    return None


def requeue(job_id: str) -> str | None:
    """`scontrol requeue`; the reason it failed, or None."""
    try:
        out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"scontrol requeue {job_id} failed: {err}"
    if out.returncode != 0:
        return f"scontrol requeue {job_id} failed: {out.stderr.strip() or out.returncode}"
    return None


def after_stop(stop_reason: str, step: int, is_main: bool, max_requeues: int) -> int:
    """Called on every rank once all have left the loop after a stop; returns the exit code.

    Rank 0 requeues the job when it may; the code is EXIT_STOPPED either way, since SLURM
    ends the allocation of a requeued job by itself. Under submitit's local executor the exit
    code itself asks for the restart.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        if is_main:
            LOG.info("stopped by %s at step %d, checkpoint saved; submitit's local executor "
                     "starts the tasks again", stop_reason, step)
        return EXIT_LOCAL_REQUEUE
    if not is_main:
        return EXIT_STOPPED
    job_id = slurm_job_id()
    restarts = slurm_restart_count()
    why_not = requeue_decision(job_id, restarts, max_requeues,
                               job_state(job_id) if job_id else None)
    if why_not is None:
        why_not = requeue(job_id)
    if why_not is None:
        LOG.info("stopped by %s at step %d, checkpoint saved; requeued job %s (requeue %d of "
                 "at most %d)", stop_reason, step, job_id, restarts + 1, max_requeues)
    else:
        LOG.warning("stopped by %s at step %d, checkpoint saved; not requeued (%s): start the "
                    "same command again to continue from it", stop_reason, step, why_not)
    return EXIT_STOPPED
