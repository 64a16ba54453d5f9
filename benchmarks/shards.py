"""Shards against a folder, on local disk and from a local S3 server; the index's size and the
start-up time of a run over a 10M-sample index. Prints a Markdown table and one JSON object.

    python benchmarks/shards.py [--images 256] [--rounds 3] [--samples 10000000]

Each rate is `dino-bench --data-only` (one loader process, one thread, the paper's crops:
read, decode, 2x224 + 10x96 crops) over the same 500x375 JPEGs: as a folder, as shards on
local disk, and as the same shards served by moto's standalone S3 server on this machine
(needs the dev extra). The three sources take turns in each round, so a busy machine slows
them alike; the ratios are the figures to quote.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dino_dist.bench.data_bench import project_sampler  # noqa: E402
from dino_dist.bench.images import ensure_bench_images  # noqa: E402
from dino_dist.config import Config  # noqa: E402
from dino_dist.data import open_images  # noqa: E402
from dino_dist.data.order import GlobalOrder  # noqa: E402
from dino_dist.data.sampler import ShardedEpochSampler  # noqa: E402
from dino_dist.data.shard_index import SAMPLE_DTYPE, ShardEntry, write_index  # noqa: E402
from dino_dist.data.shard_store import LocalStore  # noqa: E402
from dino_dist.data.shard_write import write_shards  # noqa: E402
from tests.s3_server import start_s3_server  # noqa: E402

BUCKET = "dinobench"


def start_s3(shards: Path) -> tuple[Callable[[], None], dict]:
    """The test suite's local S3 server (moto's), holding the shards under s3://dinobench/set."""
    import boto3

    endpoint, stop = start_s3_server()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(shards.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            client.upload_file(str(path), BUCKET, f"set/{path.relative_to(shards)}")
    return stop, env


def loader_rates(sources: dict[str, str], images: int, rounds: int, batch: int) -> dict[str, float]:
    """Images/s of one loader process per source, the sources taking turns in each round."""
    import torch

    torch.set_num_threads(1)
    data_cfg = Config().data
    samplers = {name: project_sampler(data_cfg, open_images(path)) for name, path in sources.items()}
    for sample in samplers.values():
        sample(list(range(4)))  # warm-up: connections, first allocations
    seconds = dict.fromkeys(samplers, 0.0)
    per_round = images // rounds
    for r in range(rounds):
        for name, sample in samplers.items():
            began = time.perf_counter()
            for start in range(r * per_round, (r + 1) * per_round, batch):
                sample(list(range(start, min(start + batch, (r + 1) * per_round))))
            seconds[name] += time.perf_counter() - began
    return {name: per_round * rounds / spent for name, spent in seconds.items()}


def synthetic_index(folder: Path, samples: int, per_shard: int = 10_000) -> None:
    """An index of `samples` samples over sparse shard files of the sizes it records."""
    shards = [ShardEntry(f"{i:06d}.tar", per_shard * 110_000, per_shard)
              for i in range(samples // per_shard)]
    rows = np.zeros(samples, dtype=SAMPLE_DTYPE)
    rows["offset"] = np.tile(np.arange(per_shard, dtype=np.int64) * 110_000 + 1024, len(shards))
    rows["size"] = 100_000
    rows["label"] = np.arange(samples) % 1000
    keys = np.char.zfill(np.arange(samples).astype("S9"), 9)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        with open(folder / shard.name, "wb") as f:
            f.truncate(shard.bytes)
    write_index(LocalStore(folder), shards, rows, keys, None)


def startup_seconds(folder: Path, world_size: int = 8) -> dict[str, float]:
    """Open the set (index, listing check) and find rank 0's first batch of 64, as a run does."""
    began = time.perf_counter()
    images = open_images(str(folder))
    opened = time.perf_counter()
    sampler = ShardedEpochSampler(len(images), world_size, 0, seed=0, order=GlobalOrder(len(images), 0))
    sampler.set_epoch(0)
    iterator = iter(sampler)
    first = [next(iterator)[1] for _ in range(64)]
    located = [images.shards.locate(i) for i in first]
    done = time.perf_counter()
    assert len(located) == 64
    return {"open_s": opened - began, "first_batch_s": done - opened, "total_s": done - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192, help="JPEGs timed per source")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="samples a loader process fetches together")
    parser.add_argument("--samples", type=int, default=10_000_000, help="samples of the synthetic index")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = ensure_bench_images(tmp / "jpegs", count=args.images)
        write_shards(folder, tmp / "shards", samples_per_shard=64, progress=False)
        stop_s3, _ = start_s3(tmp / "shards")
        try:
            rates = loader_rates({"folder": str(folder), "shards, local disk": str(tmp / "shards"),
                                  "shards, local S3 server": f"s3://{BUCKET}/set"},
                                 args.images, args.rounds, args.batch)
        finally:
            stop_s3()
        index = tmp / "shards" / "dino-index"
        per_sample = sum((index / n).stat().st_size for n in ("samples.npy", "keys.npy")) / args.images
        synthetic_index(tmp / "big", args.samples)
        startup = startup_seconds(tmp / "big")
        big_index = sum(p.stat().st_size for p in (tmp / "big" / "dino-index").iterdir())
    print("| source | images/s per loader process | vs folder |\n| --- | --- | --- |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / rates['folder']:.2f}x |")
    print(f"\nindex: {per_sample * 1e6 / 2**20:.1f} MiB per million samples (this set's keys); "
          f"{args.samples:,} samples: {big_index / 2**20:.0f} MiB, run start-up (open + first "
          f"batch of rank 0 of 8) {startup['total_s']:.2f} s")
    print(json.dumps({"rates": rates, "index_bytes_per_sample": per_sample,
                      "synthetic_samples": args.samples, "synthetic_index_bytes": big_index,
                      "startup": startup}))


if __name__ == "__main__":
    main()
