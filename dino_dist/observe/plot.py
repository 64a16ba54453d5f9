"""PNG figures of a run's curves from its metrics.jsonl (the `dino-plot` command's work).

    dino-plot runs/demo                # writes runs/demo/plots/*.png and prints their names
    dino-plot runs/demo --out figs/

Needs matplotlib (`pip install -e ".[plot]"`). A figure whose columns the run never logged
(k-NN without periodic evaluation, device memory on CPU) is left out. A resumed run logs
some steps twice; the later record of a step wins. The evaluation figure draws the
random-init backbone's k-NN (end-of-run report) as dashed levels across the run's steps, and
linear-probe accuracy when the run logged it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from dino_dist.errors import PlotError

FIGURE_SIZE_IN, DPI = (8.0, 4.5), 100  # 800 x 450 pixels
LEGEND_INSIDE_MAX = 3  # a panel with more lines has its legend beside it: "best" then overlaps


class Curve(NamedTuple):
    """One metrics.jsonl column in a panel."""
    column: str
    label: str
    color: str | None = None  # fixed where a baseline shares the colour of its curve
    baseline: bool = False  # one value (the column's last), dashed across the run's steps


class Line(NamedTuple):
    """What a panel draws for one curve: the figure at the data level, before matplotlib."""
    label: str
    points: list[tuple[int, float]]
    color: str | None
    baseline: bool


# (file name, title, [[Curve]]): one panel per inner list.
FIGURES = [
    ("loss", "DINO loss", [[Curve("loss", "train loss"), Curve("val_loss", "validation loss")],
                           [Curve("loss_global", "student on the other global crop"),
                            Curve("loss_local", "student on local crops")],
                           [Curve("loss_ratio", "loss / ln(out_dim)")],
                           [Curve("loss_dino", "DINO term"), Curve("loss_koleo", "KoLeo term"),
                            Curve("loss_ibot", "iBOT patch term")]]),
    ("schedules", "Schedules", [[Curve("lr", "lr")], [Curve("wd", "weight decay")],
                                [Curve("teacher_momentum", "teacher momentum")],
                                [Curve("teacher_temp", "teacher temperature")]]),
    ("grad_norms", "Gradient norms (before clipping)",
     [[Curve("grad_norm", "total"), Curve("grad_norm_backbone", "backbone"),
       Curve("grad_norm_head", "head"), Curve("grad_norm_last_layer", "last layer")]]),
    ("collapse", "Collapse diagnostics",
     [[Curve("entropy_ratio", "teacher entropy / ln(out_dim)"),
       Curve("agreement", "student-teacher argmax agreement")],
      [Curve("kl", "student-teacher KL")], [Curve("prototypes_used", "prototypes in use")],
      [Curve("patch_entropy_ratio", "iBOT patch targets: entropy / ln(out_dim)")],
      [Curve("patch_prototypes_used", "iBOT patch prototypes in use")]]),
    ("memory", "Memory (MB)", [[Curve("host_rss_mb", "host RSS"),
                                Curve("device_allocated_mb", "allocated"),
                                Curve("device_reserved_mb", "reserved"),
                                Curve("device_peak_mb", "device peak")]]),
    ("knn", "Evaluation: accuracy (%)",
     [[Curve("knn_top1", "k-NN top-1", "C0"), Curve("knn_top5", "k-NN top-5", "C1"),
       Curve("knn_top1_random_init", "k-NN top-1, random init", "C0", baseline=True),
       Curve("knn_top5_random_init", "k-NN top-5, random init", "C1", baseline=True),
       Curve("linear_top1", "linear probe top-1", "C2"),
       Curve("linear_top5", "linear probe top-5", "C3")]]),
]


def read_series(metrics_path: Path) -> dict[str, list[tuple[int, float]]]:
    """column -> [(step, value)] sorted by step; a step logged twice keeps its last value."""
    if not metrics_path.is_file():
        raise PlotError(f"{metrics_path} not found: pass a run directory (train.output_dir) "
                        f"of a run that has logged at least one step")
    by_column: dict[str, dict[int, float]] = {}
    for number, line in enumerate(metrics_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill while being written
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_column.setdefault(name, {})[int(record["step"])] = float(value)
    return {name: sorted(points.items()) for name, points in by_column.items()}


def step_range(series: dict[str, list[tuple[int, float]]]) -> tuple[int, int]:
    """First and last step the run logged anything at."""
    steps = [step for points in series.values() for step, _ in points]
    return min(steps), max(steps)


def curve_line(curve: Curve, series: dict, first: int, last: int) -> Line:
    points = series[curve.column]
    if curve.baseline:
        level = points[-1][1]
        points = [(first, level), (last, level)]
    return Line(curve.label, points, curve.color, curve.baseline)


def figure_lines(series: dict, panels: list[list[Curve]]) -> list[list[Line]]:
    """The lines of each panel that has data; curves the run never logged are left out.

    A baseline (the random-init backbone's k-NN, measured once at the end) is a level, not a
    history: it spans the run's steps so the curves can be read against it."""
    first, last = step_range(series) if series else (0, 0)
    last = max(last, first + 1)  # a run of one logged step still gets a visible level
    drawn = []
    for panel in panels:
        lines = [curve_line(c, series, first, last) for c in panel if c.column in series]
        if lines:
            drawn.append(lines)
    return drawn


def draw_line(ax, line: Line) -> None:
    steps, values = zip(*line.points)
    if line.baseline:
        ax.plot(steps, values, linestyle="--", linewidth=1.2, color=line.color, label=line.label)
        return
    # One point (k-NN only at the end) needs a marker big enough to see; few points a small one.
    marker, size = ("o", 7) if len(steps) == 1 else ("." if len(steps) < 30 else None, None)
    ax.plot(steps, values, marker=marker, markersize=size, color=line.color, label=line.label)


def draw_figure(series: dict, name: str, title: str, panels: list, out_dir: Path):
    import matplotlib.pyplot as plt

    drawn = figure_lines(series, panels)
    if not drawn:
        return None
    fig, axes = plt.subplots(len(drawn), 1, figsize=FIGURE_SIZE_IN, dpi=DPI, sharex=True,
                             squeeze=False)
    for ax, lines in zip(axes[:, 0], drawn):
        for line in lines:
            draw_line(ax, line)
        if len(lines) > LEGEND_INSIDE_MAX:  # beside the axes, where it cannot hide a curve
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize="small", loc="best")
        ax.grid(alpha=0.3)
    if any(len(lines) > LEGEND_INSIDE_MAX for lines in drawn):
        fig.subplots_adjust(right=0.74)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(title)
    path = out_dir / f"{name}.png"
    fig.savefig(path)  # figsize and dpi fix the size in pixels: no tight bounding box
    plt.close(fig)
    return path


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise PlotError('dino-plot needs matplotlib: pip install -e ".[plot]"') from None
    matplotlib.use("Agg")  # files only, no display needed
    series = read_series(Path(run_dir) / "metrics.jsonl")
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [draw_figure(series, name, title, panels, out_dir) for name, title, panels in FIGURES]
    return [path for path in written if path is not None]
