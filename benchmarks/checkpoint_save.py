"""How long a checkpoint save blocks training, for a config's model size.

    python benchmarks/checkpoint_save.py --config configs/vit_small_16.yaml [--repeats 3]
    python benchmarks/checkpoint_save.py --config configs/vit_small_16.yaml --sharded [--async]

Builds the config's student, teacher, AdamW (with its moment buffers filled) and DINO loss on
CPU, then times the save exactly as training does it: gathering the state, writing the data
file, fsync, rename, checksum, manifest, directory fsync (`--sharded`: the FSDP folder format
through DCP; `--async`: the time until training may go on, with the background write's
total time beside it). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
import torch

from dino_dist.checkpoint.writer import CheckpointWriter
from dino_dist.config import load_config
from dino_dist.distributed.env import DistEnv
from dino_dist.training.build import build_objective, build_optimizer, build_student_teacher
from dino_dist.training.engine import DinoEngine
from dino_dist.training.schedules import build_schedules
from dino_dist.training.state import TrainingState


class NoEvaluation:
    def state_dict(self) -> None:
        return None


def state_for(config_path: str, overrides: list[str]) -> TrainingState:
    """A training state of the config's model size, with AdamW's moments filled."""
    cfg = load_config(config_path, overrides)
    student, teacher = build_student_teacher(cfg)
    optimizer = build_optimizer(student, cfg, torch.device("cpu"))
    for p in student.parameters():  # one step fills AdamW's two moment buffers per tensor
        p.grad = torch.zeros_like(p)
    optimizer.step()
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    engine = DinoEngine(student, student, teacher, build_objective(cfg, torch.device("cpu")), optimizer,
                        build_schedules(cfg, 1, 1), env)
    state = TrainingState(engine, NoEvaluation(), cfg.to_dict(), env)
    state.cfg = cfg
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--sharded", action="store_true", help="FSDP folder format (DCP)")
    parser.add_argument("--async", dest="async_save", action="store_true",
                        help="with --sharded: background writing")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    state = state_for(args.config, args.overrides)
    seconds, totals = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        writer = CheckpointWriter(Path(folder), True, keep_last=1, sharded=args.sharded,
                                  async_save=args.async_save)
        for repeat in range(args.repeats):
            started = time.perf_counter()
            state.position = dataclasses.replace(state.position, step=repeat)
            path = writer.save(state)
            seconds.append(time.perf_counter() - started)
            writer.wait()  # in training this wait overlaps the steps until the next save
            totals.append(time.perf_counter() - started)
        size = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size
    params = sum(p.numel() for p in state.engine.student.parameters())
    print(json.dumps({"config": args.config, "format": "sharded" if args.sharded else "file",
                      "async": args.async_save, "arch": state.cfg.model.arch,
                      "out_dim": state.cfg.model.out_dim, "student_params_m": round(params / 1e6, 2),
                      "checkpoint_mb": round(size / 2**20, 1),
                      "save_blocking_s_median": round(statistics.median(seconds), 3),
                      "save_blocking_s_all": [round(s, 3) for s in seconds],
                      "save_total_s_median": round(statistics.median(totals), 3),
                      "mb_per_s": round(size / 2**20 / statistics.median(seconds), 1)}))


if __name__ == "__main__":
    main()
