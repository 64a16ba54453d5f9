"""dino-bench and dino-submit report every user error as the other commands do: one line
`prog: error: ...` on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys

from dino_dist.cli.submit import submit
from tests.conftest import REPO, subprocess_env

TINY = ["model.arch=vit_mini", "model.patch_size=8", "model.img_size=16", "model.out_dim=256",
        "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "data.global_crop_size=16",
        "data.local_crops_number=2", "data.local_crop_size=8", "optim.batch_size_per_gpu=4",
        "train.device=cpu"]


def test_bench_reports_a_diverging_step_in_one_line(tmp_path):
    # A huge learning rate: the first step's weights overflow the second step's forward.
    args = ["--steps", "2", "--rounds", "1", "--warmup", "1", "--phase-steps", "0", *TINY,
            f"train.output_dir={tmp_path}", "optim.lr=1e30", "optim.warmup_epochs=0",
            "train.max_nonfinite_steps=0"]
    result = subprocess.run([sys.executable, "-m", "dino_dist.cli.bench", *args], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == "", result.stderr[-3000:]
    assert result.stderr.startswith("dino-bench: error: "), result.stderr[-3000:]
    assert "had a non-finite loss" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_submit_reports_sbatch_refusing_the_job_in_one_line(tmp_path, capsys, monkeypatch):
    # A stand-in for a cluster's sbatch that refuses the partition, as a real one does.
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.parent.mkdir()
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\n"
                      "exit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{sbatch.parent}{os.pathsep}{os.environ['PATH']}")
    assert submit(["--partition", "nope", f"train.output_dir={tmp_path / 'run'}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("submit.py: error: sbatch refused the job (sbatch: error: invalid "
                          "partition specified: nope)")
