"""The aten-op counter and the profile of dino-bench, and the op budgets they keep: the ops of
the device augmentation and of a training step must not grow with the batch (each op is a
kernel launch on a GPU, where a small model's step is bound by launches)."""
from __future__ import annotations

import pytest
import torch

from dino_dist.bench.augment_bench import decoded_batch
from dino_dist.bench.op_count import count_ops
from dino_dist.bench.step_profile import _union_us, profile_steps
from dino_dist.config import DataConfig
from dino_dist.data.device_augment import augment_batch
from dino_dist.data.recipe import CropRecipe
from tests.test_bench import TINY, bench_json

# Ops per crop size of one augment_batch call; 220 before the blend steps were merged.
AUGMENT_OPS_PER_CROP_SIZE = 150


def test_counter_counts_computing_ops_and_the_backward_not_views():
    x = torch.randn(4, 4, requires_grad=True)
    counter = count_ops(lambda: (x * 2 + 1).view(-1).t().sum().backward())
    # forward mul, add, sum; backward: ones_like for the seed and mul for d(2x); views free.
    assert counter.counts == {"mul": 2, "add": 1, "sum": 1, "ones_like": 1}
    assert counter.total == 5 and counter.top(1) == {"mul": 2}


def test_device_augmentation_ops_do_not_grow_with_the_batch():
    data = DataConfig()  # the paper's crops: 2 x 224 and 10 x 96
    groups = len(CropRecipe.from_config(data).groups)
    batches = [decoded_batch(data, size, torch.device("cpu")) for size in (2, 5)]
    augment = [count_ops(lambda: augment_batch(batch)).total for batch in batches]
    assert augment[0] == augment[1]
    assert 0 < augment[0] <= AUGMENT_OPS_PER_CROP_SIZE * groups


def test_dino_bench_reports_ops_per_step_that_do_not_grow_with_the_batch(tmp_path):
    reports = [bench_json("--steps", "1", "--rounds", "1", "--warmup", "1", "--phase-steps", "0",
                          *TINY, f"optim.batch_size_per_gpu={batch}", "model.drop_path_rate=0.1",
                          f"train.output_dir={tmp_path / str(batch)}")
               for batch in (2, 4)]
    ops = [report["aten_ops_per_step"] for report in reports]
    assert ops[0] == ops[1] > 0
    top = reports[0]["top_step_ops"]
    assert {"addmm", "native_layer_norm"} <= set(top) and sum(top.values()) <= ops[0]
    augment = reports[0]["augment_on_device"]
    assert augment["aten_ops_per_call"] > 0 and augment["ms_per_micro_batch"] > 0
    assert augment["batch_size"] == 2


def test_device_busy_time_counts_overlapping_kernels_once():
    assert _union_us([(20, 25), (0, 10), (5, 12), (21, 22), (12, 12)]) == 17
    assert _union_us([]) == 0


def test_profile_on_cpu_names_the_top_aten_ops():
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(256, 64)
    report = profile_steps(lambda: layer(x).sum().backward(), 3, torch.device("cpu"))
    assert report["steps"] == 3 and report["ms_per_step"] > 0
    assert "aten::addmm" in report["top_cpu_ops_ms_per_step"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profile_on_cuda_counts_kernels_and_busy_share():
    layer = torch.nn.Linear(512, 512).cuda()
    x = torch.randn(4096, 512, device="cuda")
    report = profile_steps(lambda: layer(x).sum().backward(), 3, torch.device("cuda"))
    assert report["kernels_per_step"] >= 3 and 0 < report["device_busy_share"] <= 1
    assert report["top_kernels_ms_per_step"]
