"""SLURM: submitting a run through submitit, and the requeue policy after a stop."""
