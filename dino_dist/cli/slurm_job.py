"""The callable that launch/submit.py hands to submitit: dino-train in every task of the job.

It is the same `dino_dist.cli.train` entry as a plain or torchrun process. Stopping on a signal,
saving and requeueing are dino-train's own (see `dino_dist.cluster.requeue`), so the sbatch path
behaves the same; this class only adapts submitit's conventions around it.
"""
from __future__ import annotations

import os
import sys

from dino_dist.cluster.requeue import EXIT_LOCAL_REQUEUE, EXIT_STOPPED
from dino_dist.distributed.stop import install_stop_handlers


class TrainJob:
    def __init__(self, config: str, overrides: list[str]) -> None:
        self.config = config
        self.overrides = list(overrides)

    def argv(self) -> list[str]:
        return ["--config", self.config, *self.overrides]

    def __call__(self) -> str:
        # First thing, before the heavy imports: submitit's own USR2 handler would requeue
        # at once, without the save at the step boundary.
        install_stop_handlers(include_term=True)
        if os.environ.get("SUBMITIT_EXECUTOR") == "local":
            export_local_rendezvous()
        from dino_dist.cli.train import main

        code = main(self.argv())
        if code in (EXIT_STOPPED, EXIT_LOCAL_REQUEUE):
            # No result file: the job was requeued (or the log says why not) and is not over.
            sys.exit(code)
        if code != 0:
            raise RuntimeError(f"dino-train {' '.join(self.argv())} exited with {code}: "
                               f"the reason is in this job's log")
        return "finished"

    def checkpoint(self, *args, **kwargs):
        """submitit calls this only for a USR2 that comes before __call__ has installed the
        handlers, when nothing has trained yet: requeue the same job unchanged."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def export_local_rendezvous() -> None:
    """submitit's local executor starts one process per task with its own variables; give
    them the torchrun-style ones dino_dist.distributed.env reads."""
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
