"""Sending a run to SLURM through submitit, and following it through its requeues.

Cluster settings come from the command's options, else from the config's `slurm:` section,
else from SLURM's own defaults; nothing about any cluster is written here. The options are
also passed to the job as `slurm.*` overrides, so the run directory's config.yaml records them
and the job knows its `slurm.max_requeues`.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dino_dist.config import Config, SlurmConfig, load_config
from dino_dist.cluster.requeue import job_state
from dino_dist.errors import SubmitError

# SLURM states after which the job will not run again by itself. A requeued job passes
# through REQUEUED and PENDING instead; PREEMPTED is left out because clusters that requeue
# on preemption show it before PENDING.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}
# Option name → SlurmConfig field, for the options that override the config's slurm section.
SLURM_OPTIONS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb",
                 "partition", "account", "qos", "constraint", "timeout_min", "signal_delay_s",
                 "max_requeues", "job_name")


def resolve_config(config_path: str, args: argparse.Namespace) -> tuple[Config, list[str]]:
    """The run's config with the options applied to its slurm section, and those options as
    overrides for the job."""
    words = [f"slurm.{name}={getattr(args, name)}" for name in SLURM_OPTIONS
             if getattr(args, name) is not None]
    cfg = load_config(config_path, [*args.overrides, *words])
    settings = cfg.slurm
    if settings.tasks_per_node == 0:
        settings.tasks_per_node = settings.gpus_per_node or 1
    return cfg, words


def slurm_parameters(s: SlurmConfig) -> dict:
    """AutoExecutor parameters: generic ones, and `slurm_` ones only where something is set."""
    params = {"timeout_min": s.timeout_min, "nodes": s.nodes, "tasks_per_node": s.tasks_per_node,
              "name": s.job_name, "slurm_signal_delay_s": s.signal_delay_s}
    optional = {"gpus_per_node": s.gpus_per_node, "cpus_per_task": s.cpus_per_task,
                "mem_gb": s.mem_gb, "slurm_partition": s.partition, "slurm_account": s.account,
                "slurm_qos": s.qos, "slurm_constraint": s.constraint}
    params.update({k: v for k, v in optional.items() if v})
    # --requeue: some clusters refuse `scontrol requeue` for jobs not marked requeueable.
    params["slurm_additional_parameters"] = {"requeue": True}
    # A trapped TERM keeps the batch shell alive until srun ends, so a TERM sent to the whole
    # job (preemption with a grace time) leaves the tasks time to save.
    params["slurm_setup"] = ["trap 'echo \"batch script: SIGTERM; the tasks save and stop\"' TERM"]
    return params


def local_parameters(s: SlurmConfig) -> dict:
    params = {"timeout_min": s.timeout_min, "tasks_per_node": s.tasks_per_node,
              "signal_delay_s": s.signal_delay_s}
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    return params


def make_executor(folder: Path, settings: SlurmConfig, local: bool):
    import submitit

    if local:
        if settings.nodes != 1:
            raise SubmitError(f"--local runs on this machine only, got --nodes "
                              f"{settings.nodes}: drop --nodes or submit to SLURM")
        executor = submitit.LocalExecutor(folder=folder / "%j")
        executor.update_parameters(**local_parameters(settings))
        return executor
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: submit from a SLURM login node, or use --local "
                          "to run through submitit's local executor")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(**slurm_parameters(settings))
    return executor


def wait_slurm(job_id: str, poll_s: float = 2.0) -> str:
    """Follow the job through requeues with squeue (sacct needs an accounting database)."""
    last, unseen = None, 0
    while True:
        state = job_state(job_id)
        if state != last and state is not None:
            print(f"job {job_id}: {state}")
            sys.stdout.flush()
            last = state
        if state in FINAL_STATES:
            return state
        # None several polls in a row: squeue has forgotten the job (not a busy controller).
        unseen = unseen + 1 if state is None else 0
        if unseen >= 5:
            seen = f"{last} (last seen; the job left squeue)" if last else "UNKNOWN to squeue"
            return last_known_state(job_id) or seen
        time.sleep(poll_s)


def last_known_state(job_id: str) -> str | None:
    """After squeue forgets a job (MinJobAge), ask sacct where a cluster has accounting."""
    if shutil.which("sacct") is None:
        return None
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-o", "State"],
                         capture_output=True, text=True)
    words = out.stdout.split()
    return words[0] if out.returncode == 0 and words else None


def wait_local(job) -> str:
    try:
        job.results()  # one per task
        return "COMPLETED"
    except Exception as err:  # submitit re-raises the job's failure with its traceback
        print(f"job {job.job_id} failed: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return "FAILED"
