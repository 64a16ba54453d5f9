"""dino-plot on a real run directory: PNG files that open as images of the expected size; and
what each figure draws, at the data level, on metrics.jsonl files written by hand."""
from __future__ import annotations

import json
import subprocess

from PIL import Image

from dino_dist.observe.plot import (DPI, FIGURE_SIZE_IN, FIGURES, Line, draw_line, figure_lines,
                                    plot_run, read_series)
from tests.conftest import REPO, run_train, subprocess_env, tiny_overrides, write_image_folder
from tests.test_cli import console_script


def test_dino_plot_writes_the_run_figures(tmp_path):
    data = write_image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    run_train(tiny_overrides(data, run_dir, **{
        "eval.every_epochs": 1, "eval.train_path": str(data), "eval.val_path": str(data),
        "eval.val_loss_path": str(data), "eval.image_size": 16, "eval.batch_size": 16}))
    result = subprocess.run([console_script("dino-plot"), str(run_dir)], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.split()
    series = read_series(run_dir / "metrics.jsonl")
    assert {"loss_global", "loss_local", "agreement"} <= set(series)  # the loop logs them
    names = sorted(p.rsplit("/", 1)[-1] for p in printed)
    # CPU run: no device memory columns, but host RSS makes the memory figure.
    assert names == ["collapse.png", "grad_norms.png", "knn.png", "loss.png", "memory.png",
                     "schedules.png"]
    expected = (int(FIGURE_SIZE_IN[0] * DPI), int(FIGURE_SIZE_IN[1] * DPI))
    for path in printed:
        assert path.startswith(str(run_dir / "plots"))
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == expected
            image.load()  # decodes: the file is complete


def test_a_step_logged_twice_keeps_its_last_value(tmp_path):
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "loss": 3.5},
             {"step": 2, "knn_top1": 40.0, "warnings": ["x"]}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n{cut")
    series = read_series(tmp_path / "metrics.jsonl")
    assert series == {"loss": [(1, 5.0), (2, 3.5)], "knn_top1": [(2, 40.0)]}


def test_a_folder_without_metrics_is_one_line_error(tmp_path):
    result = subprocess.run([console_script("dino-plot"), str(tmp_path)], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "metrics.jsonl not found" in result.stderr


PANELS = {name: panels for name, _title, panels in FIGURES}


def write_metrics(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def evaluation_run(tmp_path, linear: bool = False):
    """12 logged steps, periodic k-NN at 4, 8, 12, then the end-of-run report at step 12."""
    records = [{"step": s, "loss": 5.0 - 0.1 * s} for s in range(1, 13)]
    records += [{"step": s, "knn_top1": 20.0 + s, "knn_top5": 60.0 + s} for s in (4, 8, 12)]
    records.append({"step": 12, "knn_top1": 33.0, "knn_top5": 73.0,
                    "knn_top1_random_init": 18.5, "knn_top5_random_init": 55.0})
    if linear:
        records.append({"step": 12, "linear_top1": 41.0, "linear_top5": 80.0})
    write_metrics(tmp_path / "metrics.jsonl", records)
    return read_series(tmp_path / "metrics.jsonl")


def test_evaluation_figure_draws_the_random_init_baseline_across_the_run(tmp_path):
    [lines] = figure_lines(evaluation_run(tmp_path), PANELS["knn"])
    by_label = {line.label: line for line in lines}
    assert set(by_label) == {"k-NN top-1", "k-NN top-5", "k-NN top-1, random init",
                             "k-NN top-5, random init"}  # no linear probe logged
    assert by_label["k-NN top-1"] == Line("k-NN top-1", [(4, 24.0), (8, 28.0), (12, 33.0)],
                                          "C0", False)
    # A dashed level over the run's steps (1..12), in its curve's colour.
    assert by_label["k-NN top-1, random init"] == Line(
        "k-NN top-1, random init", [(1, 18.5), (12, 18.5)], "C0", True)
    assert by_label["k-NN top-5, random init"].points == [(1, 55.0), (12, 55.0)]
    assert [path.name for path in plot_run(tmp_path) if path.name == "knn.png"] == ["knn.png"]


def test_evaluation_figure_adds_the_linear_probe_when_logged(tmp_path):
    [lines] = figure_lines(evaluation_run(tmp_path, linear=True), PANELS["knn"])
    linear = [line for line in lines if line.label.startswith("linear probe")]
    assert [(line.label, line.points) for line in linear] == [
        ("linear probe top-1", [(12, 41.0)]), ("linear probe top-5", [(12, 80.0)])]


def test_end_of_run_knn_alone_is_a_visible_point_beside_its_baseline(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_metrics(tmp_path / "metrics.jsonl", [
        {"step": s, "loss": 4.0} for s in range(1, 6)] + [
        {"step": 5, "knn_top1": 30.0, "knn_top5": 70.0, "knn_top1_random_init": 20.0,
         "knn_top5_random_init": 50.0}])
    [lines] = figure_lines(read_series(tmp_path / "metrics.jsonl"), PANELS["knn"])
    point, baseline = lines[0], lines[2]
    assert point.points == [(5, 30.0)] and baseline.points == [(1, 20.0), (5, 20.0)]
    fig, ax = plt.subplots()
    draw_line(ax, point)
    draw_line(ax, baseline)
    assert ax.lines[0].get_marker() == "o" and ax.lines[0].get_markersize() >= 6
    assert ax.lines[1].get_linestyle() == "--"
    plt.close(fig)


def test_loss_split_and_agreement_have_their_panels(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", [
        {"step": s, "loss": 5.0, "loss_global": 4.0, "loss_local": 5.5, "agreement": 0.1 * s,
         "entropy_ratio": 0.9, "kl": 0.3} for s in (1, 2)])
    series = read_series(tmp_path / "metrics.jsonl")
    loss_panels = figure_lines(series, PANELS["loss"])
    assert [[line.label for line in panel] for panel in loss_panels] == [
        ["train loss"], ["student on the other global crop", "student on local crops"]]
    [health, _kl] = figure_lines(series, PANELS["collapse"])
    assert health[1] == Line("student-teacher argmax agreement", [(1, 0.1), (2, 0.2)], None,
                             False)
