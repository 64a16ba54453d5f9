"""Schedule arrays at known steps."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dino_dist.config import ConfigError, load_config
from dino_dist.training.schedules import (LR_SCHEDULES, build_schedules, cosine_schedule, lr_schedule,
                                 teacher_temp_schedule)
from tests.conftest import run_train, tiny_overrides, write_image_folder


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


# Every lr schedule: 2 warm-up epochs of 5 steps, then 20 decay steps from 1.0 to 0.1.
SCHEDULE_ARGS = dict(base=1.0, final=0.1, epochs=6, steps_per_epoch=5, warmup_epochs=2)


def test_every_lr_schedule_warms_up_linearly_from_zero():
    for kind in LR_SCHEDULES:
        s = lr_schedule(kind, **SCHEDULE_ARGS, cycle_epochs=1, decay_epochs=2)
        assert len(s) == 30, kind
        assert s[0] == 0.0 and s[5] == pytest.approx(0.5) and s[10] == pytest.approx(1.0), kind


def test_cosine_is_the_dino_schedule():
    s = lr_schedule("cosine", **SCHEDULE_ARGS)
    assert np.array_equal(s, cosine_schedule(1.0, 0.1, 6, 5, 2))
    assert s[10 + 10] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 10 / 20)))


def test_linear_decay_reaches_min_at_the_last_step():
    s = lr_schedule("linear", **SCHEDULE_ARGS)
    assert s[10 + 19] == pytest.approx(0.1)
    assert s[10 + 5] == pytest.approx(1.0 - 0.9 * 5 / 19)


def test_cosine_restarts_return_to_the_peak_each_cycle():
    s = lr_schedule("cosine_restarts", **SCHEDULE_ARGS, cycle_epochs=1)  # cycles of 5 steps
    for cycle_start in (10, 15, 20, 25):
        assert s[cycle_start] == pytest.approx(1.0)
        assert s[cycle_start + 2] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 2 / 5)))
    assert s[14] < s[15]


def test_polynomial_decay_uses_the_configured_power():
    s = lr_schedule("polynomial", **SCHEDULE_ARGS, power=2.0)
    t = 7
    assert s[10 + t] == pytest.approx(0.1 + 0.9 * (1 - t / 19) ** 2)
    assert s[-1] == pytest.approx(0.1)


def test_constant_after_decay_holds_the_minimum():
    s = lr_schedule("constant_after_decay", **SCHEDULE_ARGS, decay_epochs=2)  # 10 decay steps
    assert s[10 + 4] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 4 / 10)))
    assert np.allclose(s[20:], 0.1)
    assert s[19] > 0.1


def test_config_chooses_the_lr_schedule():
    cfg = load_config(None, ["optim.lr_schedule=polynomial", "optim.lr_power=3",
                             "optim.warmup_epochs=0", "train.epochs=2", "optim.min_lr=0",
                             "optim.batch_size_per_gpu=256", "optim.lr=0.001"])
    sched = build_schedules(cfg, world_size=1, steps_per_epoch=6)
    assert sched.lr[0] == pytest.approx(0.001)
    assert sched.lr[4] == pytest.approx(0.001 * (1 - 4 / 11) ** 3)


def test_schedules_needing_a_length_refuse_zero():
    with pytest.raises(ConfigError, match="optim.lr_cycle_epochs"):
        load_config(None, ["optim.lr_schedule=cosine_restarts"])
    with pytest.raises(ConfigError, match="optim.lr_decay_epochs"):
        load_config(None, ["optim.lr_schedule=constant_after_decay"])


def test_a_resumed_run_continues_the_schedule_where_it_left_off(tmp_path):
    data = write_image_folder(tmp_path / "images")  # 32 images: 4 steps per epoch
    run_dir = tmp_path / "run"
    common = dict(**{"optim.lr_schedule": "cosine_restarts", "optim.lr_cycle_epochs": 1,
                     "optim.warmup_epochs": 1, "train.epochs": 3})
    run_train(tiny_overrides(data, run_dir, **common, **{"train.max_steps": 6}))
    run_train(tiny_overrides(data, run_dir, **common))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    cfg = load_config(None, tiny_overrides(data, run_dir, **common))
    expected = build_schedules(cfg, world_size=1, steps_per_epoch=4).lr
    assert [r["lr"] for r in records] == pytest.approx(list(expected))
    assert records[4]["lr"] == pytest.approx(records[8]["lr"])  # each cycle restarts at the peak
