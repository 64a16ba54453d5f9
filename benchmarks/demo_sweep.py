"""The demo-recipe study: real `dino-train` runs of recipe variants on several seeds, one table.

    python benchmarks/demo_sweep.py --variants landed,one_polarity --seeds 0 --parallel 2
    python benchmarks/demo_sweep.py --variants demo --seeds 0,1,2 --parallel 1   # the shipped demo

Each variant is a list of overrides on top of a config file (the shipped demo, or the recipe
the demo had before this study). Every run writes its own folder under --out; the table (k-NN
of the teacher and of the random-init backbone, their margin, the teacher's entropy / ln K and
prototypes in use at the end and at their worst, the health warnings, wall time) is printed
and appended to --out/table.md as runs finish, so an interrupted study keeps what it measured.
Runs in parallel share the cores equally (OMP threads per run = cores / --parallel); the wall
times of a run that shared the machine are longer than the demo's own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
BEFORE = REPO / "tests" / "configs" / "demo_near_collapse.yaml"  # the recipe this study started from

# name: (base config, demo images version, overrides). The history of the study: each line is
# one hypothesis about DINO's collapse balance on small data, tested against the recipe the
# demo started from (`landed`: k-NN 55.8 % vs 38.2 % random init on seed 0).
VARIANTS: dict[str, tuple[Path, int, list[str]]] = {
    "demo": (DEMO, 3, []),
    # the demo before its KoLeo term (benchmarks/dinov2_study.py): k-NN 81.3-82.3 % on seeds 0-2
    "demo_without_koleo": (DEMO, 3, ["loss.koleo_weight=0"]),
    "landed": (BEFORE, 2, []),
    "free_last_layer": (BEFORE, 2, ["model.norm_last_layer=false"]),
    "lr_5e-4_warmup3": (BEFORE, 2, ["optim.lr=0.0005", "optim.warmup_epochs=3"]),
    "local_crops_6": (BEFORE, 2, ["data.local_crops_number=6"]),
    "one_polarity": (BEFORE, 3, []),
    "one_polarity_teacher_temp_0.02": (BEFORE, 3, ["loss.teacher_temp=0.02",
                                                   "loss.warmup_teacher_temp=0.02"]),
    "one_polarity_momentum_0.996": (BEFORE, 3, ["optim.teacher_momentum=0.996",
                                                "optim.teacher_momentum_end=1.0"]),
    "one_polarity_25_epochs": (BEFORE, 3, ["train.epochs=25"]),
    "one_polarity_out_dim_4096": (BEFORE, 3, ["model.out_dim=4096"]),
    "one_polarity_out_dim_4096_25_epochs": (BEFORE, 3, ["model.out_dim=4096", "train.epochs=25"]),
    "one_polarity_out_dim_4096_25_epochs_free_last_layer": (
        BEFORE, 3, ["model.out_dim=4096", "train.epochs=25", "model.norm_last_layer=false"]),
    "one_polarity_out_dim_4096_25_epochs_warmup5": (
        BEFORE, 3, ["model.out_dim=4096", "train.epochs=25", "optim.warmup_epochs=5"]),
    "one_polarity_out_dim_4096_25_epochs_batch128": (
        BEFORE, 3, ["model.out_dim=4096", "train.epochs=25", "optim.batch_size_per_gpu=128"]),
    "one_polarity_25_epochs_momentum_0.99": (
        BEFORE, 3, ["train.epochs=25", "optim.teacher_momentum=0.99",
                    "optim.teacher_momentum_end=0.998"]),
    "demo_25_epochs": (DEMO, 3, ["train.epochs=25", "eval.every_epochs=5"]),
    "demo_40_epochs": (DEMO, 3, ["train.epochs=40", "eval.every_epochs=5"]),
    "demo_out_dim_16384": (DEMO, 3, ["model.out_dim=16384"]),
}


def data_overrides(base: Path, version: int) -> list[str]:
    """The demo images of `version` (2: each image in a random polarity; 3: one polarity)
    as the training and k-NN folders; the shipped demo finds its own."""
    if base == DEMO:
        return []
    from dino_dist.data.demo import ensure_demo_dataset
    images = ensure_demo_dataset(version=version)
    return [f"data.path={images / 'train'}", f"eval.train_path={images / 'train'}",
            f"eval.val_path={images / 'val'}"]


def run_one(name: str, seed: int, out: Path, threads: int) -> dict:
    base, version, overrides = VARIANTS[name]
    run_dir = out / f"{name}_seed{seed}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "dino_dist.train", "--config", str(base),
           *data_overrides(base, version), *overrides,
           f"train.seed={seed}", f"train.output_dir={run_dir}"]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / f"{name}_seed{seed}.log").write_text(result.stdout + result.stderr)
    row = {"variant": name, "seed": seed, "exit": result.returncode, "wall_min": wall / 60}
    if result.returncode == 0:
        row.update(read_run(run_dir))
    return row


def read_run(run_dir: Path) -> dict:
    final = json.loads((run_dir / "training_summary.json").read_text())["final_metrics"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "entropy_ratio" in r]
    warnings = sorted({w for r in records for w in r.get("warnings", [])})
    return {
        "knn": final["knn_top1"], "random": final["knn_top1_random_init"],
        "margin": final["knn_top1"] - final["knn_top1_random_init"],
        "h_end": final["entropy_ratio"], "proto_end": final["prototypes_used"],
        "h_min": min(r["entropy_ratio"] for r in logged),
        "proto_min": min(r["prototypes_used"] for r in logged),
        "warnings": ",".join(warnings) or "-",
    }


HEADER = ("| variant | seed | k-NN % | random init % | margin | H/lnK end | proto end | "
          "H/lnK min | proto min | warnings | wall min |\n|" + " --- |" * 11)


def table_row(row: dict) -> str:
    if row["exit"] != 0:
        return f"| {row['variant']} | {row['seed']} | exit {row['exit']} |" + " |" * 8 \
            + f" {row['wall_min']:.1f} |"
    return (f"| {row['variant']} | {row['seed']} | {row['knn']:.1f} | {row['random']:.1f} | "
            f"{row['margin']:.1f} | {row['h_end']:.2f} | {row['proto_end']} | "
            f"{row['h_min']:.2f} | {row['proto_min']} | {row['warnings']} | "
            f"{row['wall_min']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="demo", help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma list of train.seed values")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--out", default="runs/demo_sweep")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(n, int(s)) for n in names for s in args.seeds.split(",")]
    run_table(jobs, args.parallel, out, run_one, table_row, HEADER)


def run_table(jobs: list[tuple], parallel: int, out: Path, run, row_text, header: str) -> None:
    """`run(*job, out, threads)` for every job, `parallel` at a time sharing the cores; each
    row printed and appended to out/table.md as its run finishes."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    print(header, flush=True)
    with ThreadPoolExecutor(parallel) as pool, open(out / "table.md", "a") as table:
        for row in pool.map(lambda job: run(*job, out, threads), jobs):
            line = row_text(row)
            print(line, flush=True)
            table.write(line + "\n")
            table.flush()


if __name__ == "__main__":
    main()
