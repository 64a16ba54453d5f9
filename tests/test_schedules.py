"""Schedule arrays at known steps."""
from __future__ import annotations

import numpy as np
import pytest

from dino_dist.config import load_config
from dino_dist.schedules import build_schedules, cosine_schedule, teacher_temp_schedule


def test_cosine_with_warmup_values():
    s = cosine_schedule(1.0, 0.0, epochs=4, steps_per_epoch=10, warmup_epochs=1)
    assert len(s) == 40
    assert s[0] == 0.0 and s[5] == pytest.approx(0.5)
    assert s[10] == pytest.approx(1.0)  # peak right after warm-up
    assert s[10 + 15] == pytest.approx(0.5)  # half way through the cosine
    assert s[-1] == pytest.approx(0.0, abs=0.01)
    assert np.all(np.diff(s[10:]) <= 0)


def test_teacher_temperature_warms_up_per_epoch():
    s = teacher_temp_schedule(0.04, 0.07, warmup_epochs=3, epochs=5, steps_per_epoch=4)
    assert list(s[:4]) == [0.04] * 4
    assert s[4] == pytest.approx(0.055) and s[7] == pytest.approx(0.055)
    assert np.allclose(s[8:], 0.07)


def test_lr_follows_linear_scaling_by_total_batch():
    cfg = load_config(None, ["optim.lr=0.0005", "optim.batch_size_per_gpu=64",
                             "optim.accum_steps=2", "optim.warmup_epochs=1", "train.epochs=3"])
    sched = build_schedules(cfg, world_size=4, steps_per_epoch=10)
    peak = 0.0005 * 64 * 4 * 2 / 256
    assert sched.lr[10] == pytest.approx(peak)
    assert sched.total_steps == 30
    assert sched.momentum[0] == pytest.approx(cfg.optim.teacher_momentum)
    assert sched.momentum[-1] == pytest.approx(cfg.optim.teacher_momentum_end, abs=1e-4)
    assert sched.wd[0] == pytest.approx(cfg.optim.weight_decay)
    values = sched.at(12)
    assert set(values) == {"lr", "wd", "teacher_momentum", "teacher_temp"}
