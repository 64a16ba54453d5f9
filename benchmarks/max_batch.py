"""The largest per-GPU batch that trains, and what it gives: doubling batch sizes until one
runs out of device memory. One JSON line: each batch tried, with images/s, MFU and peak memory.

    python benchmarks/max_batch.py --config configs/vit_small_16.yaml --start 64 --tries 4 \
        train.precision=bf16 model.arch=vit_base

The lr needs no change: the recipe scales it linearly with the total batch by itself.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dino_dist.bench.images import ensure_bench_images  # noqa: E402
from dino_dist.bench.step_bench import BenchSettings, run_step_benchmark  # noqa: E402
from dino_dist.config import load_config  # noqa: E402
from dino_dist.distributed.env import init_distributed, teardown  # noqa: E402


def try_batch(args: argparse.Namespace, batch: int, env, images: str) -> dict:
    cfg = load_config(args.config, [*args.overrides, f"optim.batch_size_per_gpu={batch}"])
    settings = BenchSettings(steps=args.steps, warmup=1, rounds=1, phase_steps=0)
    try:
        figures = run_step_benchmark(cfg, env, settings, images)
    except torch.OutOfMemoryError:
        return {"batch": batch, "fits": False}
    finally:
        gc.collect()
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(env.device)
    keep = ("images_per_s", "mfu", "peak_device_memory_mb", "seconds_per_step")
    return {"batch": batch, "fits": True, **{key: figures[key] for key in keep}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/vit_small_16.yaml")
    parser.add_argument("--start", type=int, default=64, help="first batch per GPU")
    parser.add_argument("--tries", type=int, default=4, help="doublings at most")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    env = init_distributed(cfg.train.device)
    tried = []
    try:
        batch = args.start
        for _ in range(args.tries):
            images = str(ensure_bench_images(count=batch))  # synthetic crops; the loader needs a batch
            tried.append(try_batch(args, batch, env, images))
            if not tried[-1]["fits"]:
                break
            batch *= 2
    finally:
        teardown()
    fitting = [t for t in tried if t["fits"]]
    print(json.dumps({"mode": "max_batch", "arch": cfg.model.arch,
                      "largest_batch": fitting[-1]["batch"] if fitting else None,
                      "best_images_per_s": max((t["images_per_s"] for t in fitting), default=None),
                      "tried": tried}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
