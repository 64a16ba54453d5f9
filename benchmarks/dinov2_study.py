"""The DINOv2 terms on the demo recipe: DINO alone, + Sinkhorn-Knopp, + KoLeo, + iBOT, and all
three, on the demo's shapes and on the real-photo set, with k-NN, linear probe and collapse
figures in one table.

    pip install scikit-image     # the real-photo set (benchmarks/real_photos.py)
    python benchmarks/dinov2_study.py --sets demo,real_photos --seeds 0 --parallel 2

Every run is a real `dino-train` with configs/demo.yaml plus the variant's overrides, its
k-NN report at the end (teacher vs the same backbone at random initialisation) and a
`dino-linear` probe on the teacher. `uniform steps` is the last logged step at which the
teacher's targets still had >= 95 % of the maximum entropy (the early uniform phase) and
`warnings` the health warnings the run raised. Rows are printed and appended to
--out/table.md as runs finish.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from demo_sweep import read_run, run_table  # the same folder: one reader of a run's figures

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # dino_dist without an install, as the other benchmarks
# Every variant names all three terms, so it means the same whatever configs/demo.yaml turns
# on by default.
OFF = {"loss.centering": "center", "loss.koleo_weight": "0", "ibot.weight": "0"}
SINKHORN, KOLEO, IBOT = ({"loss.centering": "sinkhorn_knopp"}, {"loss.koleo_weight": "0.1"},
                         {"ibot.weight": "1.0"})
VARIANTS = {"dino": OFF, "sinkhorn": OFF | SINKHORN, "koleo": OFF | KOLEO, "ibot": OFF | IBOT,
            "dinov2": SINKHORN | KOLEO | IBOT}
UNIFORM = 0.95


def set_overrides(name: str, out: Path) -> list[str]:
    """The training and k-NN folders of a set ("demo" finds its own)."""
    if name == "demo":
        return []
    import real_photos
    data = real_photos.build(out / "photos")
    return [f"data.path={data / 'train'}", f"eval.train_path={data / 'train'}",
            f"eval.val_path={data / 'val'}"]


def eval_folders(name: str, out: Path) -> tuple[Path, Path]:
    if name == "demo":
        from dino_dist.data import ensure_demo_dataset
        root = ensure_demo_dataset(progress=False)
    else:
        root = out / "photos"
    return root / "train", root / "val"


def linear_probe(run_dir: Path, train: Path, val: Path, env: dict) -> float:
    checkpoint = max((run_dir / "checkpoints").glob("step_*.pt"))
    result = subprocess.run(
        [sys.executable, "-m", "dino_dist.cli.linear", "--checkpoint", str(checkpoint),
         "--train-data", str(train), "--val-data", str(val), "--epochs", "20", "--lr", "0.1",
         "--image-size", "32", "--output-dir", str(run_dir / "linear")],
        cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return float("nan")
    return float(result.stdout.rsplit("top-1 ", 1)[1].split("%", 1)[0])


def uniform_until(run_dir: Path) -> int:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("entropy_ratio", 0) >= UNIFORM]
    return max(steps, default=0)


def run_one(data_set: str, variant: str, seed: int, out: Path, threads: int) -> dict:
    run_dir = out / f"{data_set}_{variant}_seed{seed}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    terms = [f"{key}={value}" for key, value in VARIANTS[variant].items()]
    cmd = [sys.executable, "-m", "dino_dist.train", *set_overrides(data_set, out), *terms,
           f"train.seed={seed}", f"train.output_dir={run_dir}"]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / f"{run_dir.name}.log").write_text(result.stdout + result.stderr)
    row = {"set": data_set, "variant": variant, "seed": seed, "exit": result.returncode,
           "wall_min": wall / 60}
    if result.returncode == 0:
        row.update(read_run(run_dir), uniform=uniform_until(run_dir),
                   linear=linear_probe(run_dir, *eval_folders(data_set, out), env))
    return row


HEADER = ("| set | variant | seed | k-NN % | random init % | linear % | H/lnK end | proto end "
          "| uniform until step | warnings | wall min |\n|" + " --- |" * 11)


def table_row(row: dict) -> str:
    head = f"| {row['set']} | {row['variant']} | {row['seed']} |"
    if row["exit"] != 0:
        return head + f" exit {row['exit']} |" + " |" * 7 + f" {row['wall_min']:.1f} |"
    return (head + f" {row['knn']:.1f} | {row['random']:.1f} | {row['linear']:.1f} | "
            f"{row['h_end']:.2f} | {row['proto_end']} | {row['uniform']} | "
            f"{row['warnings']} | {row['wall_min']:.1f} |")


SUMMARY_HEADER = ("| set | variant | seeds | k-NN % mean (min-max) | linear % mean (min-max) "
                  "| proto end mean | runs that warned |\n|" + " --- |" * 7)


def summary(table: Path) -> list[str]:
    """One line per (set, variant) of a study's table.md: the means over its seeds (a run
    rerun with the same seed counts once, its last row)."""
    runs: dict[tuple[str, str], dict[str, list[str]]] = {}
    for line in table.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 11 or not cells[2].isdigit() or cells[3].startswith("exit"):
            continue  # header, separator, or a failed run
        runs.setdefault((cells[0], cells[1]), {})[cells[2]] = cells
    lines = [SUMMARY_HEADER]
    for (data_set, variant), by_seed in sorted(runs.items()):
        rows = list(by_seed.values())
        knn, linear, proto = ([float(r[i]) for r in rows] for i in (3, 5, 7))
        warned = sum(r[9] != "-" for r in rows)
        lines.append(f"| {data_set} | {variant} | {','.join(sorted(by_seed))} | {spread(knn)} | "
                     f"{spread(linear)} | {sum(proto) / len(proto):.0f} | {warned} of {len(rows)} |")
    return lines


def spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="demo,real_photos")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma list of train.seed values")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--out", default="runs/dinov2_study")
    parser.add_argument("--summary", action="store_true",
                        help="print the means over seeds of --out/table.md and run nothing")
    args = parser.parse_args()
    if args.summary:
        print("\n".join(summary(Path(args.out) / "table.md")))
        return
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {list(VARIANTS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sets = args.sets.split(",")
    for data_set in sets:
        set_overrides(data_set, out)  # build the real-photo set once, before runs share it
    jobs = [(s, v, int(seed)) for s in sets for v in variants for seed in args.seeds.split(",")]
    run_table(jobs, args.parallel, out, run_one, table_row, HEADER)


if __name__ == "__main__":
    main()
