"""`dino-train`: parse → run → exit code. The same entry serves a plain process, torchrun and
SLURM (`python -m dino_dist.train` is this command).

    dino-train                                   # the CPU demo (configs/demo.yaml)
    dino-train --config configs/vit_small_16.yaml data.path=/data/train optim.lr=1e-4
    torchrun --nproc_per_node=8 -m dino_dist.train --config configs/vit_small_16.yaml ...
"""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from dino_dist.cli.command import report_error
from dino_dist.cluster.requeue import after_stop
from dino_dist.config import key_docs, load_config
from dino_dist.data import resolve_data_root
from dino_dist.distributed.collectives import barrier, describe_collective_failure
from dino_dist.distributed.env import init_distributed, teardown
from dino_dist.distributed.lifeline import watch_launcher
from dino_dist.distributed.slurm_env import under_slurm
from dino_dist.distributed.stop import ignore_stop_signals, install_stop_handlers
from dino_dist.errors import USER_ERRORS, DataError, RunDirectoryBusy, one_line

LOG = logging.getLogger("dino_dist")
STARTUP_TIMEOUT_S = 1800  # scanning a large dataset or writing the demo images can take a while


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dino-train", description="Train a DINO model (no --config: the CPU demo).",
        epilog=config_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=1e-4")
    return parser.parse_args(argv)


def config_keys_help() -> str:
    """Every config key, its default and rule, and its comment: read from the config's
    fields, so the listing changes with the code."""
    lines = ["config keys: set any with section.key=VALUE after the options (default after '=')"]
    for doc in key_docs():
        rule = f"  ({doc.rule})" if doc.rule else ""
        lines.append(f"  {doc.key} = {as_override(doc.default)}{rule}")
        # Whole words only: a line broken inside "k-NN" would read as two words.
        lines.append(textwrap.fill(doc.comment, width=100, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6, break_on_hyphens=False,
                                   break_long_words=False))
    return "\n".join(lines)


def as_override(value: object) -> str:
    """A value as it is written after `key=` (or in the YAML file)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(as_override(v) for v in value) + "]"
    return str(value) if value != "" else '""'


def main(argv: list[str] | None = None) -> int:
    # First: a preemption signal during start-up must stop at the first step, not kill,
    # and a worker whose launcher is gone must not go on writing into the run directory.
    install_stop_handlers(include_term=under_slurm())
    watch_launcher()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.path != "demo":
            resolve_data_root(cfg.data)  # a bad folder fails before any process group starts
        env = init_distributed(cfg.train.device,
                               timeout_s=max(STARTUP_TIMEOUT_S, cfg.train.dist_timeout_s))
    except USER_ERRORS as err:
        return report_error("dino-train", err)
    try:
        from dino_dist.training.run import TrainingRun  # heavy imports after argument checks

        try:
            end = TrainingRun(cfg, env).execute()
        except RunDirectoryBusy as err:  # refused before anything was touched: like a bad config
            return report_error("dino-train", err) if env.is_main else 2
        # Leave together: a rank that tore its process group down while another was still
        # finishing (writing the summary) was seen to abort at exit (SIGABRT) under FSDP.
        barrier()
        ignore_stop_signals()  # nothing left to save: a late signal must not kill the exit
        if end.stop_reason:
            return after_stop(end.stop_reason, end.position.step, env.is_main,
                              cfg.slurm.max_requeues)
        return 0
    except USER_ERRORS as err:
        if env.is_main and LOG.handlers:
            LOG.error("dino-train: error: %s", one_line(err))
        elif env.is_main or isinstance(err, DataError):  # data fails on one rank, maybe not 0
            where = "" if env.is_main else f"rank {env.rank}: "
            print(f"dino-train: error: {where}{one_line(err)}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as err:
        explained = describe_collective_failure(err, cfg.train.dist_timeout_s)
        if explained is None:
            raise
        # Every surviving rank says it: the one that noticed first may not be rank 0.
        print(f"dino-train: error: rank {env.rank}: {explained}", file=sys.stderr, flush=True)
        return 1
    finally:
        teardown()


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
