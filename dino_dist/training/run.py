"""One `dino-train` run on this rank, in four visible phases: set up, resume, train, finish.

    run = TrainingRun(cfg, env)
    end = run.execute()      # set_up() -> resume() -> train() -> finish()

Every rank runs every phase; what only rank 0 does (files, logs) is decided inside the pieces
it calls. A run whose training succeeded finishes without raising: the end-of-run k-NN and
the summary are reports, and their failure is a warning.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import yaml

from dino_dist.checkpoint.run_lock import RunLock
from dino_dist.checkpoint.writer import CheckpointWriter
from dino_dist.config import Config, dump_config
from dino_dist.data import ensure_demo_dataset
from dino_dist.distributed.collectives import barrier, broadcast_object, set_collective_timeout
from dino_dist.distributed.env import DistEnv
from dino_dist.errors import CheckpointError, DataError, NonFiniteLossError, RunDirectoryBusy
from dino_dist.eval.attention import attention_grid_for
from dino_dist.eval.end_of_run import knn_datasets, plan_knn_at_end, report_knn_at_end
from dino_dist.eval.periodic import PeriodicEvaluation
from dino_dist.observe.metrics import MetricsWriter, setup_logging
from dino_dist.observe.summary import build_summary, failure_summary, write_summary
from dino_dist.training.build import build_training
from dino_dist.training.loop import LoopEnd, Position, train_loop
from dino_dist.training.resume import refuse_fresh_start_over_checkpoints, resume
from dino_dist.training.schedules import total_batch_size
from dino_dist.training.state import TrainingState

LOG = logging.getLogger("dino_dist")


class TrainingRun:
    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.started = time.perf_counter()
        self.saved_at: set[int] = set()
        self.loop_seconds = 0.0  # stays 0 for a run that stopped early before this start

    def execute(self) -> LoopEnd:
        """Train until the config's end or a stop request; LoopEnd says which, and where."""
        # First of all: nothing in the directory is read, written or deleted before it is ours.
        self.lock = take_run_directory(self.output_dir, self.env)
        try:
            self.set_up()
            start = self.resume()
            try:
                end = self.train(start)
                self.finish(start, end)
            finally:
                self.metrics.close()
                if sys.exc_info()[0] is not None:
                    self.writer.wait()  # even on an error, let a started save finish and commit
            return end
        finally:
            if self.lock is not None:
                self.lock.release()  # after the last write (a background save included)

    # -- set up: folders, logging, data, models; every mistake knowable now is reported now
    def set_up(self) -> None:
        cfg, env = self.cfg, self.env
        refuse_fresh_start_over_checkpoints(cfg, self.checkpoint_dir)
        setup_logging(self.output_dir, env.is_main)
        if self.lock is not None and self.lock.takeover:
            LOG.warning("%s", self.lock.takeover)
        if env.is_main:
            write_resolved_config(cfg, self.output_dir)
        if cfg.data.path == "demo" and env.is_local_main:
            ensure_demo_dataset(cfg.data.demo_dir or None)  # node-local work: once per node
        barrier()
        LOG.info("rank %d of %d on %s; output in %s", env.rank, env.world_size, env.device,
                 self.output_dir)
        self.knn_sets = knn_datasets(cfg)  # a bad evaluation folder stops the run here
        self.knn_at_end = plan_knn_at_end(cfg, self.knn_sets)
        self.attention = attention_grid_for(cfg, env.device)  # images read once, checked now
        self.attention_step = -1  # the step of the last grid written (no repeat at the end)
        self.training = build_training(cfg, env)
        self.engine = self.training.engine
        self.evaluation = PeriodicEvaluation(cfg, env, self.engine, self.training.teacher,
                                             self.knn_sets)
        self.state = TrainingState(self.engine, self.evaluation, cfg.to_dict(), env)
        sharded = cfg.train.parallel == "fsdp"
        self.writer = CheckpointWriter(self.checkpoint_dir, env.is_main, cfg.checkpoint.keep_last,
                                       cfg.checkpoint.keep_every_epochs, sharded,
                                       cfg.checkpoint.async_save)
        self.best_writer = CheckpointWriter(self.checkpoint_dir / "best", env.is_main, 1,
                                            sharded=sharded)

    # -- resume: the newest valid checkpoint, or a fresh start
    def resume(self) -> Position:
        start = resume(self.cfg, self.state, self.checkpoint_dir, self.env)
        set_collective_timeout(self.cfg.train.dist_timeout_s)  # start-up is over: fail fast
        self.saved_at.add(start.step)
        self.metrics = MetricsWriter(self.output_dir, self.env.is_main, self.cfg.log.tensorboard,
                                     config=self.cfg)
        return start

    # -- train: the loop, with saves and periodic evaluation at its boundaries
    def train(self, start: Position) -> LoopEnd:
        cfg, env, engine = self.cfg, self.env, self.engine
        LOG.info("training %s for %d steps (%d per epoch), total batch %d", cfg.model.arch,
                 engine.schedules.total_steps, engine.schedules.steps_per_epoch,
                 total_batch_size(cfg, env.world_size))
        stopped = self.evaluation.stopped_early()
        if stopped:  # a restart of a run that stopped early stays stopped
            return LoopEnd(start, None, stopped)
        loop_start = time.perf_counter()
        try:
            end = train_loop(cfg, env, engine, self.training.loader, self.training.sampler,
                             self.metrics, start, self.save, self.on_epoch_end)
        except NonFiniteLossError as err:
            if env.is_main:
                write_summary(self.output_dir, failure_summary(
                    f"error: {err}", time.perf_counter() - self.started, env.world_size,
                    start.step, self.metrics.latest))
            raise
        self.loop_seconds = time.perf_counter() - loop_start
        return end

    def save(self, position: Position) -> None:
        """A collective: every rank contributes its RNG state (and, sharded, its shards)."""
        self.state.position = position
        path = self.writer.save(self.state)
        self.saved_at.add(position.step)
        LOG.info("saved %s%s", path,
                 " (writing in the background)" if self.writer.writes_in_background else "")
        if self.evaluation.last_improved_step == position.step:  # only one best is kept
            best = self.best_writer.save(self.state)
            LOG.info("saved %s (best %s so far)", best, self.evaluation.best.metric)

    def on_epoch_end(self, position: Position) -> str | None:
        """Periodic evaluation (before the epoch's save, so its state is in that checkpoint);
        the early-stopping reason, if any."""
        every = self.cfg.eval.every_epochs  # the grid needs no labelled or held-out data
        if self.attention and every and position.epoch % every == 0:
            self.write_attention(position.step)
        if not self.evaluation.due(position.epoch):
            return None
        values, early_stop = self.evaluation.run(position.step, position.epoch,
                                                 position.schedule_step)
        self.metrics.write(position.step, values)
        return early_stop

    def write_attention(self, step: int) -> None:
        """The teacher's attention grid to TensorBoard; every rank runs the forward (a sharded
        teacher gathers its parameters in it), rank 0 writes."""
        if step != self.attention_step:
            self.metrics.add_images("attention", self.attention.render(self.training.teacher), step)
            self.attention_step = step

    # -- finish: the last checkpoint committed, then the reports
    def finish(self, start: Position, end: LoopEnd) -> None:
        if end.position.step not in self.saved_at:
            self.save(end.position)
        self.writer.wait()  # a background save is committed before the run reports its end
        if end.early_stop:
            LOG.info("%s; the checkpoint of step %d is the final one", end.early_stop,
                     end.position.step)
        if end.stop_reason:
            LOG.info("stopped at step %d (%s); the checkpoint of this step is committed and "
                     "a restart continues from it", end.position.step, end.stop_reason)
        else:
            if self.attention:
                self.write_attention(end.position.step)
            if self.knn_at_end:
                self.report_knn(end.position.step)
        if self.env.is_main:
            self.write_summary(start, end)

    def report_knn(self, step: int) -> None:
        try:
            scores = report_knn_at_end(self.cfg, self.env, self.training.teacher, self.knn_sets)
        except (DataError, OSError) as err:  # training succeeded: report, do not fail
            LOG.warning("the end-of-run k-NN failed (%s); the final checkpoint is committed: "
                        "evaluate it with dino-knn --checkpoint", err)
            return
        self.metrics.write(step, scores)

    def write_summary(self, start: Position, end: LoopEnd) -> None:
        final = {k: v for k, v in self.metrics.latest.items() if k != "warnings"}
        best = self.evaluation.state_dict()["best"]
        summary = build_summary(self.cfg, end, start.step, time.perf_counter() - self.started,
                                self.loop_seconds, self.env.world_size, best,
                                final)
        try:
            path = write_summary(self.output_dir, summary)
        except OSError as err:  # the checkpoint is committed: the run is not lost
            LOG.warning("cannot write %s (%s); the final checkpoint is committed",
                        self.output_dir / "training_summary.json", err.strerror or err)
            return
        LOG.info("wrote %s (%s)", path, summary["stop_reason"])


def take_run_directory(output_dir: Path, env: DistEnv) -> RunLock | None:
    """Rank 0 takes the run directory's lock (held by rank 0, None elsewhere); every rank
    learns the outcome, so all ranks refuse together, before any of them touches a file."""
    lock, refusal = None, None
    if env.is_main:
        try:
            lock = RunLock(output_dir).acquire()
        except (RunDirectoryBusy, CheckpointError) as err:
            refusal = (isinstance(err, RunDirectoryBusy), str(err))
    refusal = broadcast_object(refusal)
    if refusal is not None:
        busy, line = refusal
        raise RunDirectoryBusy(line) if busy else CheckpointError(line)
    return lock


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
