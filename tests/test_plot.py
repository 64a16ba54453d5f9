"""dino-plot on a real run directory: PNG files that open as images of the expected size."""
from __future__ import annotations

import json
import subprocess

from PIL import Image

from dino_dist.observe.plot import DPI, FIGURE_SIZE_IN, read_series
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
