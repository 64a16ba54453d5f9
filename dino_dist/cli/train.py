"""`dino-train`: parse → build → run. The same entry serves a plain process, torchrun and SLURM.

    dino-train                                   # the CPU demo (configs/demo.yaml)
    dino-train --config configs/vit_small_16.yaml data.path=/data/train optim.lr=1e-4
    torchrun --nproc_per_node=8 -m dino_dist.cli.train --config configs/vit_small_16.yaml ...
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import yaml

from dino_dist.checkpoint.single_file import (CheckpointError, check_compatible, list_checkpoints,
                                  load_checkpoint, load_newest_valid, remove_unfinished_writes,
                                  restore_training_state, training_state)
from dino_dist.checkpoint.writer import CheckpointWriter
from dino_dist.config import Config, ConfigError, dump_config, load_config
from dino_dist.data import DataError, ensure_demo_dataset, resolve_data_root
from dino_dist.distributed.env import (DistEnv, barrier, describe_collective_failure, init_distributed,
                            set_collective_timeout, teardown)
from dino_dist.training.engine import NonFiniteLossError
from dino_dist.eval.end_of_run import knn_datasets, plan_knn_at_end, report_knn_at_end
from dino_dist.training.loop import LoopEnd, Position, train_loop
from dino_dist.training.schedules import total_batch_size
from dino_dist.checkpoint.sharded import load_weights as load_sharded_weights
from dino_dist.observe.metrics import MetricsWriter, setup_logging
from dino_dist.eval.periodic import PeriodicEvaluation
from dino_dist.observe.summary import build_summary, failure_summary, write_summary
from dino_dist.cluster.requeue import (after_stop, ignore_stop_signals, install_stop_handlers,
                                  under_slurm)

LOG = logging.getLogger("dino_dist")
USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError)
STARTUP_TIMEOUT_S = 1800  # scanning a large dataset or writing the demo images can take a while


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dino-train", description="Train a DINO model (no --config: the CPU demo).")
    parser.add_argument("--config", default=None, help="YAML config (default configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=1e-4")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # First: a preemption signal during start-up must stop at the first step, not kill.
    install_stop_handlers(include_term=under_slurm())
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.path != "demo":
            resolve_data_root(cfg.data)  # a bad folder fails before any process group starts
    except USER_ERRORS as err:
        print(f"dino-train: error: {err}", file=sys.stderr)
        return 2
    env = init_distributed(cfg.train.device, timeout_s=max(STARTUP_TIMEOUT_S, cfg.train.dist_timeout_s))
    try:
        end = run(cfg, env)
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
            LOG.error("dino-train: error: %s", err)
        elif env.is_main:  # failed before logging was set up
            print(f"dino-train: error: {err}", file=sys.stderr)
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


def write_resolved_config(cfg: Config, output_dir: Path) -> None:
    """config.yaml is written once; a restart with other settings is logged, not overwritten."""
    path = output_dir / "config.yaml"
    if not path.exists():
        dump_config(cfg, path)
        return
    before = yaml.safe_load(path.read_text()) or {}
    changed = [f"{s}.{k}: {before.get(s, {}).get(k)!r} -> {v!r}"
               for s, values in cfg.to_dict().items() for k, v in values.items()
               if before.get(s, {}).get(k) != v]
    if changed:
        LOG.info("config differs from %s: %s", path, "; ".join(changed))


def run(cfg: Config, env: DistEnv) -> LoopEnd:
    """Train until the config's end or a stop request; LoopEnd says which, and where."""
    from dino_dist.training.build import build_training  # heavy imports after argument checks

    output_dir = Path(cfg.train.output_dir)
    refuse_fresh_start_over_checkpoints(cfg, output_dir / "checkpoints")
    if env.is_main:
        check_writable(output_dir)
    setup_logging(output_dir, env.is_main)
    if env.is_main:
        write_resolved_config(cfg, output_dir)
    if cfg.data.path == "demo" and env.is_local_main:
        ensure_demo_dataset(cfg.data.demo_dir or None)  # node-local work: once per node
    barrier()
    LOG.info("rank %d of %d on %s; output in %s", env.rank, env.world_size, env.device, output_dir)
    run_start = time.perf_counter()
    knn_sets = knn_datasets(cfg)  # a bad evaluation folder stops the run before training
    knn_at_end = plan_knn_at_end(cfg, knn_sets)
    training = build_training(cfg, env)
    engine = training.engine
    evaluation = PeriodicEvaluation(cfg, env, engine, training.teacher, knn_sets)
    start = resume_if_possible(cfg, engine, output_dir / "checkpoints", env, evaluation)
    set_collective_timeout(cfg.train.dist_timeout_s)  # start-up is over: detect dead ranks fast
    metrics = MetricsWriter(output_dir, env.is_main, cfg.log.tensorboard)
    saved_at = {start.step}
    sharded = cfg.train.parallel == "fsdp"
    writer = CheckpointWriter(output_dir / "checkpoints", env.is_main, cfg.checkpoint.keep_last,
                              cfg.checkpoint.keep_every_epochs, sharded,
                              cfg.checkpoint.async_save)
    best_writer = CheckpointWriter(output_dir / "checkpoints" / "best", env.is_main, 1,
                                   sharded=sharded)

    def save(pos: Position) -> None:
        state = training_state(engine, cfg.to_dict(), dataclasses.asdict(pos))
        state["evaluation"] = evaluation.state_dict()
        path = writer.save(engine, state)
        saved_at.add(pos.step)
        LOG.info("saved %s%s", path, " (writing in the background)" if writer.sharded and
                 cfg.checkpoint.async_save else "")
        if evaluation.last_improved_step == pos.step:  # only one best is kept
            best = best_writer.save(engine, state)
            LOG.info("saved %s (best %s so far)", best, evaluation.best.metric)

    def on_epoch_end(pos: Position) -> str | None:
        if not evaluation.due(pos.epoch):
            return None
        values, early_stop = evaluation.run(pos.step, pos.epoch, pos.schedule_step)
        metrics.write(pos.step, values)
        return early_stop

    try:
        LOG.info("training %s for %d steps (%d per epoch), total batch %d", cfg.model.arch,
                 engine.schedules.total_steps, engine.schedules.steps_per_epoch,
                 total_batch_size(cfg, env.world_size))
        loop_start = time.perf_counter()
        stopped = evaluation.stopped_early()
        try:
            end = LoopEnd(start, None, stopped) if stopped else train_loop(
                cfg, env, engine, training.loader, training.sampler, metrics, start, save,
                on_epoch_end)
        except NonFiniteLossError as err:
            if env.is_main:
                write_summary(output_dir, failure_summary(
                    f"error: {err}", time.perf_counter() - run_start, env.world_size, start.step,
                    metrics.latest))
            raise
        loop_time = time.perf_counter() - loop_start
        if end.position.step not in saved_at:
            save(end.position)
        writer.wait()  # a background save is committed before the run reports its end
        if end.early_stop:
            LOG.info("%s; the checkpoint of step %d is the final one", end.early_stop,
                     end.position.step)
        if end.stop_reason:
            LOG.info("stopped at step %d (%s); the checkpoint of this step is committed and "
                     "a restart continues from it", end.position.step, end.stop_reason)
        elif knn_at_end:
            try:
                report_knn_at_end(cfg, env, training.teacher, knn_sets, metrics,
                                  end.position.step)
            except (DataError, OSError) as err:  # training succeeded: report, do not fail
                LOG.warning("the end-of-run k-NN failed (%s); the final checkpoint is "
                            "committed: evaluate it with dino-knn --checkpoint", err)
        if env.is_main:
            final = {k: v for k, v in metrics.latest.items() if k != "warnings"}
            best = evaluation.state_dict()["best"]
            try:
                path = write_summary(output_dir, build_summary(
                    cfg, end, start.step, time.perf_counter() - run_start, loop_time,
                    env.world_size, best, final))
                LOG.info("wrote %s (%s)", path, end.early_stop or end.stop_reason or "completed")
            except OSError as err:  # the checkpoint is committed: the run is not lost
                LOG.warning("cannot write %s (%s); the final checkpoint is committed",
                            output_dir / "training_summary.json", err.strerror or err)
    finally:
        metrics.close()
        if sys.exc_info()[0] is not None:
            writer.wait()  # even on an error, let a started save finish and commit
    return end


def check_writable(output_dir: Path) -> None:
    """Fail at start, in one line, on an output dir that cannot be created or written."""
    probe = output_dir / ".write_test"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"train.output_dir '{output_dir}' is not writable "
                              f"({err.strerror or err}): choose a folder you can write to")


def refuse_fresh_start_over_checkpoints(cfg: Config, checkpoint_dir: Path) -> None:
    """checkpoint.resume=false must never write over (or prune) an earlier run's checkpoints."""
    existing = list_checkpoints(checkpoint_dir)
    if not cfg.checkpoint.resume and not cfg.checkpoint.resume_from and existing:
        raise CheckpointError(
            f"checkpoint.resume=false but {checkpoint_dir} already holds {existing[0].name}: "
            f"choose an empty train.output_dir, or drop checkpoint.resume=false to continue")


def resume_if_possible(cfg: Config, engine, checkpoint_dir: Path, env: DistEnv,
                       evaluation: PeriodicEvaluation | None = None) -> Position:
    if cfg.checkpoint.resume_from:
        path = Path(cfg.checkpoint.resume_from)
        state = load_checkpoint(path, map_location=env.device)
    elif cfg.checkpoint.resume:
        if env.is_main:
            remove_unfinished_writes(checkpoint_dir)
        barrier()
        path, state = load_newest_valid(checkpoint_dir, map_location=env.device)
    else:
        path, state = None, None
    if state is None:
        return Position()
    check_compatible(path, state["config"], cfg.to_dict())
    if path.is_dir():
        load_sharded_weights(path, engine)
    elif cfg.train.parallel == "fsdp" and env.distributed:
        raise CheckpointError(
            f"checkpoint '{path}' is a single-file (DDP) checkpoint and this run shards the "
            f"model (train.parallel=fsdp): resume it with train.parallel=ddp, or start afresh "
            f"in a new train.output_dir")
    restore_training_state(engine, state)
    if evaluation is not None:
        evaluation.load_state_dict(state.get("evaluation"))
    saved = Position(int(state["step"]), int(state["epoch"]), int(state.get("epoch_step", 0)),
                     int(state.get("epoch_samples", 0)),
                     int(state.get("schedule_step", state["step"])))
    LOG.info("resumed from %s (step %d, epoch %d, %d samples of the epoch done)", path,
             saved.step, saved.epoch, saved.epoch_samples)
    saved_world = int(state.get("world_size", env.world_size))
    if saved_world == env.world_size:
        return saved
    return reshard_position(cfg, engine, saved, state["config"], saved_world, env.world_size)


def reshard_position(cfg: Config, engine, saved: Position, saved_config: dict,
                     saved_world: int, world: int) -> Position:
    """Continue on another number of processes: same samples left, schedules by progress.

    The schedules are rebuilt for this world size by the config's rules (the lr's linear
    scaling included), so they are indexed by how far through the epoch the run is, not by
    the old step count.
    """
    saved_optim = saved_config.get("optim", {})
    saved_batch = (saved_optim.get("batch_size_per_gpu", 0) * saved_world
                   * saved_optim.get("accum_steps", 1))
    batch = total_batch_size(cfg, world)
    schedule_step = (saved.epoch * engine.schedules.steps_per_epoch
                     + saved.epoch_samples // batch)
    LOG.warning(
        "resuming on %d processes a checkpoint written by %d: total batch %d -> %d, so the "
        "schedules follow the config's rules for the new batch (peak lr %.3g); epoch %d "
        "continues after its first %d samples, dealt to %d ranks (none repeated); stochastic "
        "depth restarts its random stream from the seed", world, saved_world, saved_batch,
        batch, float(engine.schedules.lr.max()), saved.epoch, saved.epoch_samples, world)
    return dataclasses.replace(saved, schedule_step=schedule_step)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
