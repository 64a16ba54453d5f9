"""Write an image folder as webdataset-layout tar shards, then index them.

Samples go into the shards in a seeded random order, so every shard mixes the classes: a
trainer that reads windows of a shard still sees mixed batches, which DINO's centering needs.
Files are copied byte for byte, not decoded (a bad image is the trainer's to skip and name),
and member metadata is fixed, so the same files and seed give the same bytes.

A finished shard name means a whole shard (each is written under a dot-name, then renamed).
A re-run after a kill writes only the missing shards, once the plan file shows that it would
write the same ones.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dino_dist.atomic_file import write_atomically
from dino_dist.errors import DataError

from .folder import find_images
from .shard_scan import IndexSummary, default_workers, index_shards, run_jobs
from .shard_store import SHARD_SUFFIX, LocalStore

PLAN_FILE = "dino-shard-plan.json"
PLAN_FORMAT = "dino_dist shard plan"
SOURCE_HINT = "give dino-shard an ImageFolder root (one sub-folder per class) or a folder of images"
OUT_HINT = "write to an empty or new folder, or delete this one to start over"
KEY_DIGITS = 9
NAME_DIGITS = 6


@dataclass(frozen=True)
class WriteSummary:
    written: int  # shards written by this run
    kept: int  # whole shards an earlier run had written
    index: IndexSummary


def write_shards(src: str | Path, out_dir: str | Path, samples_per_shard: int = 10000, seed: int = 0,
                 workers: int | None = None, progress: bool = True) -> WriteSummary:
    """Write the images under `src` as shards `000000.tar`, ... in `out_dir`, and their index."""
    if samples_per_shard < 1:
        raise DataError(f"samples per shard must be at least 1, not {samples_per_shard}")
    src, out_dir = Path(src).expanduser(), Path(out_dir).expanduser()
    files, labels, classes = find_images(src, what="source folder", hint=SOURCE_HINT)
    shards = _plan_shards(files, labels, bool(classes), samples_per_shard, seed)
    _claim_out_dir(out_dir, _plan(src, files, samples_per_shard, seed), list(shards))
    missing = [name for name in shards if not (out_dir / name).exists()]
    jobs = [(str(out_dir), name, shards[name], bool(classes)) for name in missing]
    done = len(files) - sum(len(members) for _, _, members, _ in jobs)
    with tqdm(total=len(files), initial=done, desc="writing", unit="img", file=sys.stderr,
              disable=not progress) as bar:
        for written in run_jobs(_write_shard, jobs, workers or default_workers(), processes=True):
            bar.update(written)
    index = index_shards(LocalStore(out_dir), list(shards), workers, progress, classes or None)
    return WriteSummary(len(missing), len(shards) - len(missing), index)


def _plan_shards(files: list[str], labels: list[int], labelled: bool, samples_per_shard: int,
                 seed: int) -> dict[str, list[tuple[str, str, int]]]:
    """{shard name: [(key, source file, label), ...]}, keys numbered in written order."""
    order = np.random.default_rng(seed).permutation(len(files))
    key_digits = max(KEY_DIGITS, len(str(len(files) - 1)))
    count = math.ceil(len(files) / samples_per_shard)
    name_digits = max(NAME_DIGITS, len(str(count - 1)))
    shards = {}
    for shard in range(count):
        first = shard * samples_per_shard
        rows = order[first:first + samples_per_shard].tolist()
        shards[f"{shard:0{name_digits}d}{SHARD_SUFFIX}"] = [
            (f"{first + n:0{key_digits}d}", files[row], labels[row] if labelled else -1)
            for n, row in enumerate(rows)]
    return shards


def _plan(src: Path, files: list[str], samples_per_shard: int, seed: int) -> dict:
    """What decides the shards' content, short of the files' bytes (reading them all is a full copy)."""
    paths = "\n".join(Path(f).relative_to(src).as_posix() for f in files)
    return {"format": PLAN_FORMAT, "seed": seed, "samples_per_shard": samples_per_shard,
            "files": len(files),
            "paths_sha256": hashlib.sha256(paths.encode("utf-8", "surrogateescape")).hexdigest()}


def _claim_out_dir(out_dir: Path, plan: dict, names: list[str]) -> None:
    """Make sure the shards already in `out_dir` are ones this plan writes, then record the plan."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"OUT_DIR '{out_dir}' is a file, not a folder: {OUT_HINT}")
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / PLAN_FILE
    if plan_path.exists():
        earlier = _read_plan(plan_path)
        if earlier != plan:
            raise DataError(f"'{out_dir}' holds shards of another plan ({_difference(earlier, plan)}), "
                            f"which this run would mix with its own: {OUT_HINT}")
    planned = set(names)
    foreign = sorted(entry.name for entry in os.scandir(out_dir) if entry.name.endswith(SHARD_SUFFIX)
                     and not entry.name.startswith(".") and entry.name not in planned)
    if foreign:
        raise DataError(f"'{out_dir}' holds .tar files that this run would not write ('{foreign[0]}', "
                        f"{len(foreign)} in all): {OUT_HINT}")
    if not plan_path.exists():
        write_atomically(plan_path, lambda f: f.write(json.dumps(plan, indent=1).encode()))


def _read_plan(path: Path) -> dict:
    try:
        plan = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return plan if isinstance(plan, dict) else {}


def _difference(earlier: dict, plan: dict) -> str:
    if earlier.get("format") != PLAN_FORMAT:
        return f"its {PLAN_FILE} cannot be read"
    if earlier.get("paths_sha256") != plan["paths_sha256"]:
        return (f"another list of source files: {earlier.get('files')} files there, "
                f"{plan['files']} now")
    return ", ".join(f"{name} {earlier.get(name)} there, {plan[name]} now"
                     for name in ("seed", "samples_per_shard") if earlier.get(name) != plan[name])


def _write_shard(folder: str, name: str, members: list[tuple[str, str, int]], labelled: bool) -> int:
    """Write one whole shard under its final name; the number of samples in it."""
    final = Path(folder, name)
    partial = final.with_name(f".{name}.tmp")
    try:
        with open(partial, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, path, label in members:
                    _add_member(tar, f"{key}{Path(path).suffix.lower()}", _read_source(path))
                    if labelled:
                        _add_member(tar, f"{key}.cls", str(label).encode())
            f.flush()
            os.fsync(f.fileno())  # the rename below then never exposes a shard a crash cut short
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return len(members)


def _read_source(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"source image '{path}' cannot be read ({type(error).__name__}: {error}): "
                        "make it readable or remove it, then re-run (whole shards are kept)") from error


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
