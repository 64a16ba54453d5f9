"""benchmarks/gpu.sh stays runnable without a GPU: its smoke mode (a tiny model on the CPU)
runs the parts that exercise each kind of command and ends with the one table."""
from __future__ import annotations

import json
import os
import subprocess

from conftest import REPO, subprocess_env

# One part of each kind of command: the reference step, dino-bench end to end from JPEGs
# (with the crops made on the device, profiled), the largest-batch search, the DINOv2 recipe.
PARTS = ("reference_step", "profile_vit_s_jpeg_gpu", "max_batch_vit_l", "dinov2_vit_l14")


def test_gpu_bench_smoke_runs_its_parts_and_prints_one_table(tmp_path):
    env = {**subprocess_env(), "OUT": str(tmp_path / "out"), "GPU_BENCH_SMOKE": "1",
           "GPU_BENCH_PARTS": " ".join(PARTS), "DINO_DIST_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = {}
    for name in PARTS:
        lines = (tmp_path / "out" / f"{name}.json").read_text().splitlines()
        assert lines, f"{name} wrote nothing:\n" + (tmp_path / "out" / "stderr.log").read_text()[-3000:]
        reports[name] = json.loads(lines[-1])
    jpeg = reports["profile_vit_s_jpeg_gpu"]
    assert jpeg["augment_on"] == "gpu" and jpeg["data"] == "folder"
    assert jpeg["profile"]["steps"] == 5 and jpeg["profile"]["top_cpu_ops_ms_per_step"]
    assert reports["reference_step"]["speedup_vs_reference"] > 0
    assert reports["max_batch_vit_l"]["largest_batch"] >= 2
    assert reports["dinov2_vit_l14"]["images_per_s"] > 0
    table = [l for l in result.stdout.splitlines() if l.startswith("| ")]
    assert len(table) == 2 + len(PARTS)  # header, separator and one row per part
    assert not any("no result" in row for row in table), "\n".join(table)
    profiled = [l for l in table if l.startswith("| profile_vit_s_jpeg_gpu ")]
    assert "aten ops" in profiled[0] and "augment" in profiled[0]
    assert any(l.startswith("profile_vit_s_jpeg_gpu: aten::") for l in result.stdout.splitlines())
    assert os.path.exists(tmp_path / "cache" / "gpu_bench_jpegs")
