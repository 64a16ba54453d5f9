"""`dino-shard`: an image folder → webdataset-layout tar shards and their index.

    dino-shard SRC_FOLDER OUT_DIR [--samples-per-shard 10000] [--seed 0] [--workers N] [--quiet]
    dino-shard --index SHARDS [--workers N] [--quiet]    # a folder of .tar, or s3://bucket/prefix

SRC_FOLDER is an ImageFolder tree (its classes become labels) or a plain folder of images.
`--index` indexes shards written by other tools (img2dataset, webdataset.ShardWriter). Both
resume: a re-run after a kill redoes only what was not finished.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dino_dist.cli.command import report_error
from dino_dist.data.shard_scan import IndexSummary, default_workers, index_shards
from dino_dist.data.shard_store import is_remote, open_store
from dino_dist.data.shard_write import write_shards
from dino_dist.errors import USER_ERRORS, DataError

PROG = "dino-shard"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", type=Path, metavar="SRC_FOLDER",
                        help="an ImageFolder root (one sub-folder per class) or a folder of images")
    parser.add_argument("out_dir", nargs="?", type=Path, metavar="OUT_DIR",
                        help="folder for the shards and their index")
    parser.add_argument("--index", metavar="SHARDS", help="index existing shards: a folder of .tar "
                        "files or s3://bucket/prefix (endpoint and keys from the AWS_* variables)")
    parser.add_argument("--samples-per-shard", type=positive_int, default=None, metavar="N",
                        help="default: 10000")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="of the sample order; default: 0")
    parser.add_argument("--workers", type=positive_int, default=default_workers(), metavar="N",
                        help="shards written or scanned at once; default: %(default)s")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.index is not None and (args.src is not None or args.samples_per_shard or args.seed is not None):
        parser.error("--index takes only SHARDS (and --workers, --quiet): shards that exist keep "
                     "their order")
    if args.index is None and args.out_dir is None:
        parser.error("give SRC_FOLDER and OUT_DIR to write shards, or --index SHARDS to index shards")
    return args


def describe(summary: IndexSummary, seconds: float) -> str:
    line = (f"{summary.shards} shards, {summary.samples} samples, {summary.bytes} bytes, "
            f"{seconds:.1f} s")
    if summary.skipped:
        line += f"; {summary.skipped} samples without an image left out"
    return line


def run(args: argparse.Namespace) -> str:
    started, progress = time.monotonic(), not args.quiet
    if args.index is not None:
        if not is_remote(args.index) and not Path(args.index).expanduser().is_dir():
            raise DataError(f"SHARDS '{args.index}' is not a folder: give --index a folder of .tar "
                            "shards or an s3://bucket/prefix")
        store = open_store(args.index)
        summary = index_shards(store, workers=args.workers, progress=progress)
        kept = f"; {summary.reused} shards' scans reused from an earlier run" if summary.reused else ""
        return f"indexed {store.location}: {describe(summary, time.monotonic() - started)}{kept}"
    result = write_shards(args.src, args.out_dir, args.samples_per_shard or 10000, args.seed or 0,
                          args.workers, progress)
    kept = f"; {result.kept} shards were there already" if result.kept else ""
    return f"wrote {args.out_dir}: {describe(result.index, time.monotonic() - started)}{kept}"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        line = run(args)
    except USER_ERRORS as err:
        return report_error(PROG, err)
    print(line)
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
