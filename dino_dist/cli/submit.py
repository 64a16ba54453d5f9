"""`launch/submit.py` / `dino-submit`: send a dino-train run to SLURM through submitit.

    python launch/submit.py --config configs/vit_small_16.yaml --nodes 4 --gpus-per-node 8 \\
        --partition P --timeout-min 4320 data.path=/data/imagenet/train

Cluster settings come from the options, else from the config's `slurm:` section, else from
SLURM's own defaults; nothing about any cluster is written here. The options are also passed
to the job as `slurm.*` overrides, so the run directory's config.yaml records them and the job
knows its `slurm.max_requeues`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from dino_dist.cli.command import report_error
from dino_dist.cli.slurm_job import TrainJob
from dino_dist.cluster.submit import make_executor, resolve_config, wait_local, wait_slurm
from dino_dist.config import DEFAULT_CONFIG
from dino_dist.errors import USER_ERRORS, SubmitError


PROG = "submit.py"  # as users run it: python launch/submit.py (dino-submit is the same)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description="Submit dino-train to SLURM (submitit); the job saves "
        "at the next step boundary on USR2/TERM and requeues itself.")
    p.add_argument("--config", default=None, help="YAML config (default configs/demo.yaml)")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--tasks-per-node", type=int, help="default: one per GPU, 1 without GPUs")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem-gb", type=int)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--timeout-min", type=int, help="wall-time limit of one allocation")
    p.add_argument("--signal-delay-s", type=int,
                   help="USR2 this many seconds before the limit (save, then requeue)")
    p.add_argument("--max-requeues", type=int, help="self-requeues allowed after signals")
    p.add_argument("--job-name")
    p.add_argument("--wait", action="store_true",
                   help="block until the job ends; print its final state and the run directory")
    p.add_argument("--local", action="store_true",
                   help="run through submitit's local executor (a machine without SLURM)")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=1e-4")
    return p.parse_args(argv)


def submit(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Absolute paths: the job may start in another directory, on another node.
    config_path = str(Path(args.config).resolve() if args.config else DEFAULT_CONFIG)
    try:
        cfg, slurm_words = resolve_config(config_path, args)
        run_dir = Path(cfg.train.output_dir).resolve()
        executor = make_executor(run_dir / "slurm", cfg.slurm, args.local)
        overrides = [*args.overrides, *slurm_words, f"train.output_dir={run_dir}"]
        job = send(executor, TrainJob(config_path, overrides))
    except USER_ERRORS as err:
        return report_error(PROG, err)
    print(f"job id: {job.job_id}")
    print(f"logs: {job.paths.stdout} and {job.paths.stderr} (task 0; other tasks beside them)")
    print(f"run directory: {run_dir}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    state = wait_local(job) if args.local else wait_slurm(job.job_id)
    print(f"final state: {state}")
    print(f"run directory: {run_dir}")
    return 0 if state == "COMPLETED" else 1


def send(executor, job: TrainJob):
    """Hand the job to the scheduler. sbatch refusing it (a partition, account or limit the
    cluster does not allow) is a user mistake: a SubmitError with sbatch's own words."""
    from submitit.core.utils import FailedJobError

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # submitit prints sbatch's error as well
            return executor.submit(job)
    except FailedJobError as err:
        words = (str(err).strip() or said.getvalue().strip() or "no reason given").splitlines()
        raise SubmitError(f"sbatch refused the job ({words[-1]}): "
                          f"fix the option or slurm.* setting it names") from None


def cli() -> None:
    sys.exit(submit())


if __name__ == "__main__":
    cli()
