"""PNG figures of a run's curves from its metrics.jsonl (the `dino-plot` command's work).

    dino-plot runs/demo                # writes runs/demo/plots/*.png and prints their names
    dino-plot runs/demo --out figs/

Needs matplotlib (`pip install -e ".[plot]"`). A figure whose columns the run never logged
(k-NN without periodic evaluation, device memory on CPU) is left out. A resumed run logs
some steps twice; the later record of a step wins.
"""
from __future__ import annotations

import json
from pathlib import Path

from dino_dist.errors import PlotError

FIGURE_SIZE_IN, DPI = (8.0, 4.5), 100  # 800 x 450 pixels

# (file name, title, [(column, label)] per panel): one panel per inner list.
FIGURES = [
    ("loss", "DINO loss", [[("loss", "train loss"), ("val_loss", "validation loss")],
                           [("loss_ratio", "loss / ln(out_dim)")]]),
    ("schedules", "Schedules", [[("lr", "lr")], [("wd", "weight decay")],
                                [("teacher_momentum", "teacher momentum")],
                                [("teacher_temp", "teacher temperature")]]),
    ("grad_norms", "Gradient norms (before clipping)",
     [[("grad_norm", "total"), ("grad_norm_backbone", "backbone"), ("grad_norm_head", "head"),
       ("grad_norm_last_layer", "last layer")]]),
    ("collapse", "Collapse diagnostics", [[("entropy_ratio", "teacher entropy / ln(out_dim)")],
                                          [("kl", "student-teacher KL")],
                                          [("prototypes_used", "prototypes in use")]]),
    ("memory", "Memory (MB)", [[("host_rss_mb", "host RSS"), ("device_allocated_mb", "allocated"),
                                ("device_reserved_mb", "reserved"),
                                ("device_peak_mb", "device peak")]]),
    ("knn", "Evaluation", [[("knn_top1", "k-NN top-1 (%)"), ("knn_top5", "k-NN top-5 (%)")]]),
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


def draw_figure(series: dict, name: str, title: str, panels: list, out_dir: Path):
    import matplotlib.pyplot as plt

    panels = [[(c, label) for c, label in panel if c in series] for panel in panels]
    panels = [panel for panel in panels if panel]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=FIGURE_SIZE_IN, dpi=DPI, sharex=True,
                             squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        for column, label in panel:
            steps, values = zip(*series[column])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        ax.legend(fontsize="small", loc="best")
        ax.grid(alpha=0.3)
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
