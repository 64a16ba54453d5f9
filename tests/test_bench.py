"""dino-bench: the step benchmark, the data benchmark and their parts."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dino_dist.bench.floor import ModelFloor
from dino_dist.bench.flops import count_flops, device_peak_flops, mfu
from dino_dist.bench import phases
from dino_dist.bench.phases import PhaseClock
from dino_dist.bench.reference_pipeline import ReferenceMultiCrop
from tests.conftest import REPO, subprocess_env, write_image_folder

TINY = ["model.arch=vit_mini", "model.patch_size=8", "model.img_size=16", "model.out_dim=256",
        "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "data.global_crop_size=16",
        "data.local_crops_number=2", "data.local_crop_size=8", "optim.batch_size_per_gpu=4",
        "train.device=cpu"]
STEP_PHASES = {"teacher_forward", "student_forward", "loss", "backward", "communication",
               "clip", "optimizer", "ema"}


def dino_bench(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dino_dist.cli.bench", *args], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def bench_json(*args: str) -> dict:
    result = dino_bench(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # exactly one JSON object on stdout
    return json.loads(lines[0])


def test_step_benchmark_on_synthetic_crops_reports_throughput_phases_and_efficiency(tmp_path):
    report = bench_json("--steps", "2", "--rounds", "2", "--warmup", "1", "--phase-steps", "2",
                        *TINY, f"train.output_dir={tmp_path}")
    assert report["mode"] == "step" and report["data"] == "synthetic"
    assert report["images_per_s"] > 0 and report["floor_images_per_s"] > 0
    assert report["efficiency"] == pytest.approx(
        report["images_per_s_per_rank"] / report["floor_images_per_s"], rel=0.02)
    assert report["seconds_per_step"] == pytest.approx(4 / report["images_per_s"], rel=0.02)
    shares = report["phase_share"]
    assert STEP_PHASES <= set(shares) and sum(shares.values()) == pytest.approx(1, abs=0.01)
    assert report["peak_host_rss_mb"] > 0 and report["model_gflop_per_step"] > 0
    assert report["mfu"] is None and report["peak_device_memory_mb"] is None  # CPU
    assert report["timed_steps"] == 2 and report["crops"] == {"global": [2, 16], "local": [2, 8]}


def test_step_benchmark_end_to_end_on_an_image_folder_counts_data_wait(tmp_path):
    images = write_image_folder(tmp_path / "images", classes=1, per_class=12, size=24)
    report = bench_json("--data", "folder", "--steps", "2", "--rounds", "1", "--warmup", "1",
                        "--phase-steps", "2", *TINY, f"data.path={images}", "data.num_workers=0",
                        f"train.output_dir={tmp_path / 'run'}")
    assert report["data"] == "folder" and report["images_per_s"] > 0
    # With no loader workers, decoding and augmenting happen inside the step's data phase.
    assert report["phase_share"]["data"] > 0


def write_jpegs(folder, count: int = 4) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)


def test_data_only_compares_the_pipeline_with_the_reference(tmp_path):
    write_jpegs(tmp_path / "jpegs")
    report = bench_json("--data-only", "--images", str(tmp_path / "jpegs"), "--rounds", "1",
                        "--images-per-round", "2", "data.global_crop_size=32",
                        "data.local_crop_size=16", "data.local_crops_number=3")
    assert report["mode"] == "data_only" and report["crops"] == {"global": [2, 32], "local": [3, 16]}
    ours, theirs = report["project_images_per_s_per_worker"], report["reference_images_per_s_per_worker"]
    assert ours > 0 and theirs > 0
    assert report["speedup_vs_reference"] == pytest.approx(ours / theirs, rel=0.02)


@pytest.mark.parametrize("args, message", [
    (["optim.batch_sise_per_gpu=4"], "unknown config key 'optim.batch_sise_per_gpu'"),
    (["--data-only", "data.global_crops_number=3", "--images", "/nonexistent"], "2 global crops"),
])
def test_bad_input_gets_one_line_error(args, message):
    result = dino_bench(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("dino-bench: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_step_count_is_refused_by_the_parser():
    result = dino_bench("--steps", "0")
    assert result.returncode == 2 and "--steps must be at least 1" in result.stderr


class SteppedTime:
    """Stands in for the time module inside bench.phases: the clock moves only when the test
    moves it, so the charged seconds are exact whatever the machine's load."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_phase_clock_charges_time_to_the_phase_that_ends(monkeypatch):
    fake = SteppedTime()
    monkeypatch.setattr(phases, "time", fake)
    clock = PhaseClock(torch.device("cpu"))
    clock.mark("data")  # not started: nothing is recorded
    fake.now += 5.0  # nor is the time before start()
    clock.start()
    fake.now += 0.25
    clock.mark("loss")
    fake.now += 0.75
    clock.mark("optimizer")
    clock.mark("loss")  # no time passed since the last mark
    clock.stop()
    fake.now += 1.0
    clock.mark("ema")  # stopped: nothing is recorded
    assert dict(clock.seconds) == {"loss": 0.25, "optimizer": 0.75}
    assert clock.shares() == {"loss": 0.25, "optimizer": 0.75}


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, crops):
        return self.fc(torch.cat([c.flatten(1) for c in crops]))


def test_model_floor_runs_forward_and_backward_and_leaves_no_gradients():
    student, teacher = TwoLayers(), TwoLayers()
    teacher_before = teacher.fc.weight.clone()
    calls = []
    student.fc.weight.register_hook(lambda grad: calls.append(grad.abs().sum()))
    floor = ModelFloor(student, teacher, 1, None, torch.device("cpu"))
    floor([torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)])
    assert len(calls) == 1 and calls[0] > 0  # the backward reached the student's weights
    assert student.fc.weight.grad is None and torch.equal(teacher.fc.weight, teacher_before)


def test_flop_count_of_a_linear_layer_and_mfu_arithmetic():
    layer = nn.Linear(16, 32)
    assert count_flops(layer, torch.randn(5, 16)) == 2 * 5 * 16 * 32
    assert mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
    assert mfu(1e12, 0.5, None) is None
    assert device_peak_flops(torch.device("cpu"), "bf16") is None


def test_reference_pipeline_gives_the_paper_crop_list():
    image = Image.fromarray(np.full((60, 80, 3), 100, dtype=np.uint8))
    crops = ReferenceMultiCrop((0.4, 1.0), (0.05, 0.4), 3, global_crop_size=32, local_crop_size=16)(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
