"""`dino-bench`: print one JSON object with what a DINO step (or the data pipeline) delivers.

    dino-bench                                        # configs/bench_cpu.yaml, synthetic crops
    dino-bench --config configs/vit_small_16.yaml train.precision=bf16 --compile
    dino-bench --config C --data folder data.path=/data/train   # end to end, real images
    dino-bench --data-only                            # multi-crop pipeline vs the reference
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dino_dist.cli.command import report_error
from dino_dist.config import DataConfig, load_config
from dino_dist.errors import USER_ERRORS

BENCH_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "bench_cpu.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dino-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None,
                        help="YAML config (default configs/bench_cpu.yaml; with --data-only, "
                             "the paper's crops)")
    parser.add_argument("--data-only", action="store_true",
                        help="multi-crop throughput per worker, ours vs the reference pipeline")
    parser.add_argument("--data", choices=("synthetic", "folder"), default="synthetic",
                        help="synthetic in-memory crops (compute only) or the data.path folder")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="step and floor alternate this many times (default 4)")
    parser.add_argument("--phase-steps", type=int, default=5,
                        help="steps of the synchronised per-phase pass (default 5; 0 = skip)")
    parser.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many more steps: kernels per step, GPU-busy share, "
                             "top kernels (on a CPU: top aten ops) (default 0 = off)")
    parser.add_argument("--images", default=None,
                        help="--data-only: a folder of images or a shard set (folder, pattern, "
                             "s3://) (default: generated 500x375 JPEGs)")
    parser.add_argument("--images-per-round", type=int, default=16)
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.batch_size_per_gpu=8")
    args = parser.parse_args(argv)
    for name in ("steps", "rounds", "images_per_round"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "phase_steps", "profile"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    return args


def data_only(args: argparse.Namespace) -> dict:
    from dino_dist.bench.data_bench import run_data_benchmark
    from dino_dist.bench.images import ensure_bench_images

    if args.config:
        data_cfg = load_config(args.config, args.overrides).data
    else:
        data_cfg = _paper_data(args.overrides)
    root = args.images if args.images else ensure_bench_images()
    return run_data_benchmark(data_cfg, root, args.images_per_round, args.rounds)


def _paper_data(overrides: list[str]) -> DataConfig:
    """The default DataConfig (the paper's crops) with data.* overrides applied."""
    from dino_dist.config import Config, apply_override, validate

    cfg = Config()
    for word in overrides:
        apply_override(cfg, word)
    validate(cfg)
    return cfg.data


def step_benchmark(args: argparse.Namespace) -> dict | None:
    from dino_dist.bench.images import ensure_bench_images
    from dino_dist.bench.step_bench import BenchSettings, run_step_benchmark
    from dino_dist.distributed.env import init_distributed, teardown

    config_path = args.config or BENCH_CONFIG
    cfg = load_config(config_path, args.overrides)
    settings = BenchSettings(steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                             phase_steps=args.phase_steps, synthetic=args.data == "synthetic",
                             compile=args.compile, profile_steps=args.profile)
    env = init_distributed(cfg.train.device)
    try:
        bench_images = None
        if settings.synthetic:
            # The unused loader still needs a folder with a batch of images on each rank.
            needed = cfg.optim.batch_size_per_gpu * env.world_size
            bench_images = str(ensure_bench_images(count=max(64, needed)))
        figures = run_step_benchmark(cfg, env, settings, bench_images)
    finally:
        teardown()
    if not env.is_main:
        return None
    d = cfg.data
    return {
        "mode": "step",
        "config": str(config_path),
        "arch": cfg.model.arch,
        "precision": cfg.train.precision,
        "compile": settings.compile,  # --compile: whole student and teacher
        "train_compile": cfg.train.compile,  # the training's own per-block compile
        "data": args.data,
        "device": _device_name(env.device),
        "world_size": env.world_size,
        "threads": torch.get_num_threads(),
        "batch_size_per_rank": cfg.optim.batch_size_per_gpu,
        "accum_steps": cfg.optim.accum_steps,
        "crops": {"global": [d.global_crops_number, d.global_crop_size],
                  "local": [d.local_crops_number, d.local_crop_size]},
        "out_dim": cfg.model.out_dim,
        "packed_crops": cfg.model.packed_crops,
        "augment_on": d.augment_on,  # with --data folder: where the crops were made
        "num_workers": d.num_workers if args.data == "folder" else 0,
        **figures,
    }


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = data_only(args) if args.data_only else step_benchmark(args)
    except USER_ERRORS as err:
        return report_error("dino-bench", err)
    if report is not None:
        print(json.dumps(report))
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
