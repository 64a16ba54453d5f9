"""`dino-plot RUN [--out DIR]`: PNG figures of a run's curves (prints the files it wrote)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dino_dist.cli.command import list_written, report_error
from dino_dist.errors import PlotError
from dino_dist.observe.plot import plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dino-plot", description="PNG figures of a run's curves")
    parser.add_argument("run_dir", type=Path, help="the run's train.output_dir")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (RUN/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (PlotError, OSError) as err:
        return report_error("dino-plot", err)
    return list_written(paths)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
