"""The optimizer step: short accumulation groups, precisions, and stopping on a bad loss."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dino_dist.training.build import build_objective, build_optimizer, build_student_teacher, seed_everything
from dino_dist.config import load_config
from dino_dist.distributed.env import DistEnv
from dino_dist.errors import NonFiniteLossError
from dino_dist.training.engine import DinoEngine
from dino_dist.training.loss import DINOLoss
from dino_dist.models import last_layer_parameters
from dino_dist.training.schedules import build_schedules
from tests.conftest import REPO, free_port, max_relative_error, run_train, subprocess_env, tiny_overrides

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_engine(cfg) -> DinoEngine:
    seed_everything(0)
    student, teacher = build_student_teacher(cfg)
    return DinoEngine(student, student, teacher, build_objective(cfg, torch.device("cpu")),
                      build_optimizer(student, cfg, CPU.device),
                      build_schedules(cfg, 1, steps_per_epoch=4), CPU,
                      precision=cfg.train.precision, clip_grad=cfg.optim.clip_grad,
                      last_layer_params=last_layer_parameters(student))


def tiny_cfg(tmp_path, **extra):
    return load_config(None, tiny_overrides(tmp_path, tmp_path, **extra))


def random_crops(batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)] + \
           [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(2)]


def test_short_group_is_an_exact_mean(tmp_path):
    """Two micro-batches weighted 1/2 (an epoch's short last group) equal one batch of both."""
    cfg = tiny_cfg(tmp_path)
    crops_a, crops_b = random_crops(4, 1), random_crops(4, 2)
    split = make_engine(cfg)
    for step in range(3):
        split.micro_step(crops_a, step, 0.5, sync_grads=False)
        split.micro_step(crops_b, step, 0.5, sync_grads=True)
        split.finish_step(step, epoch=1)
    whole = make_engine(cfg)
    for step in range(3):
        whole.micro_step([torch.cat(p) for p in zip(crops_a, crops_b)], step, 1.0, sync_grads=True)
        whole.finish_step(step, epoch=1)
    for part in ("student", "teacher", "loss_fn"):
        err, key = max_relative_error(getattr(split, part).state_dict(),
                                      getattr(whole, part).state_dict())
        assert err < 1e-5, f"{part}.{key} differs by {err:.2e}"


def test_last_layer_frozen_during_first_epochs(tmp_path):
    cfg = tiny_cfg(tmp_path)
    engine = make_engine(cfg)
    engine.update.freeze_last_layer_epochs = 1
    frozen = [p.detach().clone() for p in engine.last_layer_params]
    engine.micro_step(random_crops(4, 0), 1, 1.0, sync_grads=True)
    engine.finish_step(1, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, engine.last_layer_params))
    engine.micro_step(random_crops(4, 0), 2, 1.0, sync_grads=True)
    engine.finish_step(2, epoch=1)
    assert not all(torch.equal(a, b) for a, b in zip(frozen, engine.last_layer_params))


def test_teacher_is_an_ema_of_the_student(tmp_path):
    cfg = tiny_cfg(tmp_path)
    engine = make_engine(cfg)
    before = [p.detach().clone() for p in engine.teacher.parameters()]
    engine.micro_step(random_crops(4, 0), 1, 1.0, sync_grads=True)
    engine.finish_step(1, epoch=1)
    m = float(engine.schedules.momentum[1])
    for t0, t1, s in zip(before, engine.teacher.parameters(), engine.student.parameters()):
        t0, s = t0.double(), s.detach().double()
        # The engine rounds m to float32, so 1 - m carries a relative error up to ~1e-5:
        # compare at the scale of the terms, not element by element.
        scale = max(t0.abs().max(), s.abs().max(), 1e-12)
        assert (t1.double() - (m * t0 + (1 - m) * s)).abs().max() <= 1e-6 * scale


@pytest.mark.parametrize("precision, steps", [("bf16", 3), ("fp16", 10)])
def test_mixed_precision_trains_on_cpu(tmp_path, precision, steps, image_folder):
    """Finite losses and steps that train. fp16 starts from a loss scale of 2**16, too large
    for these gradients: the GradScaler skips steps, halving its scale each time, until one
    fits; the checkpoint holds the scaler as training left it."""
    run_train(tiny_overrides(image_folder, tmp_path, **{
        "train.precision": precision, "train.max_steps": steps, "train.epochs": 3}))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)  # finite
    state = torch.load(tmp_path / "checkpoints" / f"step_{steps:08d}.pt", weights_only=True)
    skipped = records[-1]["skipped_steps"]
    assert state["skipped_steps"] == skipped < steps  # some step trained
    if precision == "fp16":
        assert state["scaler"]["scale"] == 2.0**16 * 0.5**skipped  # no growth: 2,000 steps
    else:
        assert state["scaler"] == {} and skipped == 0  # bf16 needs no loss scaling


NAN_ON_RANK_1 = """
import os, sys
from dino_dist.training import loss as loss_module
forward, calls = loss_module.DINOLoss.cross_entropy, []
def poisoned(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) >= 3:
        return out * float("nan")
    return out
loss_module.DINOLoss.cross_entropy = poisoned
from dino_dist.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("read_every_step", [True, False], ids=["logged", "ordinary_steps"])
def test_non_finite_steps_on_one_rank_are_skipped_then_stop_every_rank(tmp_path, image_folder,
                                                                      read_every_step):
    """Rank 1's loss is NaN from step index 2 on: every rank skips those steps (weights
    untouched) and the third in a row, past train.max_nonfinite_steps=2, stops all. With
    ordinary steps (no logging, no saving) the verdict is read a step late: same message."""
    script = tmp_path / "nan_run.py"
    script.write_text(NAN_ON_RANK_1)
    out = tmp_path / "run"
    cadence = ({"checkpoint.every_steps": 1, "checkpoint.keep_last": 10} if read_every_step
               else {"checkpoint.every_steps": 0, "log.every_steps": 100})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script),
           *tiny_overrides(image_folder, out, **{"optim.batch_size_per_gpu": 4,
                                                 "train.max_nonfinite_steps": 2, **cadence})]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=180)  # a hung rank would hit this timeout
    assert result.returncode != 0
    messages = [l for l in result.stdout.splitlines() if "3 optimizer steps in a row" in l]
    assert len(messages) == 1, result.stdout + result.stderr  # printed once, by rank 0
    assert "non-finite loss (the last at step 4" in messages[0]
    assert "all ranks stopped" in messages[0] and "Traceback" not in result.stdout
    ckpts = out / "checkpoints"
    if not read_every_step:  # only the epoch end saved (step 4: two skipped by then)
        assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_00000004.pt"]
        assert torch.load(ckpts / "step_00000004.pt", weights_only=True)["skipped_steps"] == 2
        return
    assert not (ckpts / "step_00000005.pt").exists()
    good = torch.load(ckpts / "step_00000002.pt", weights_only=True)
    for skipped in ("step_00000003.pt", "step_00000004.pt"):
        state = torch.load(ckpts / skipped, weights_only=True)
        for part in ("student", "teacher", "loss"):
            assert all(torch.equal(good[part][k], state[part][k]) for k in good[part]), part
        assert state["skipped_steps"] > good["skipped_steps"] == 0


def test_fp16_step_with_overflowing_gradients_is_skipped_and_counted(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"train.precision": "fp16"})
    engine = make_engine(cfg)
    engine.update.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)  # gradients overflow
    before = [p.detach().clone() for p in engine.trainable]
    engine.micro_step(random_crops(4, 0), 1, 1.0, sync_grads=True)
    result = engine.finish_step(1, epoch=1)
    assert result.skipped and engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, engine.trainable))
    assert engine.scaler.get_scale() < 2.0**126  # the scaler backed off


def test_non_finite_steps_read_a_step_late_are_skipped_on_the_device(tmp_path):
    """The loop's ordinary steps: the verdict stays on the device (weights, optimizer state,
    teacher and center untouched); the count, and the stop past the limit, a step later."""
    engine = make_engine(tiny_cfg(tmp_path))
    engine.counters.max_nonfinite_steps = 1
    poisoned = [c * float("nan") for c in random_crops(4, 0)]
    engine.micro_step(random_crops(4, 1), 0, 1.0, sync_grads=True)
    assert engine.finish_step(0, epoch=1, read_now=False).skipped is None

    def snapshot():
        moments = [t for state in engine.optimizer.state.values() for t in state.values()]
        return [t.clone() for t in [*engine.trainable, *engine.ema.teacher,
                                    engine.loss_fn.center, *moments]]

    before = snapshot()
    engine.micro_step(poisoned, 1, 1.0, sync_grads=True)
    result = engine.finish_step(1, epoch=1, read_now=False)
    assert (result.loss, result.skipped, engine.skipped_steps) == (None, None, 0)
    engine.micro_step(poisoned, 2, 1.0, sync_grads=True)
    engine.finish_step(2, epoch=1, read_now=False)  # reads step 1: one skipped
    assert engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))
    engine.micro_step(poisoned, 3, 1.0, sync_grads=True)
    with pytest.raises(NonFiniteLossError, match=r"2 optimizer steps in a row .* at step 2,"):
        engine.finish_step(3, epoch=1, read_now=False)


def test_non_finite_steps_are_skipped_until_the_limit(tmp_path):
    """NaN inputs: the step leaves weights, teacher and center alone; a good step resets the
    count; max_nonfinite_steps + 1 bad steps in a row raise."""
    engine = make_engine(tiny_cfg(tmp_path))
    engine.counters.max_nonfinite_steps = 2
    poisoned = [c * float("nan") for c in random_crops(4, 0)]

    def snapshot():
        return [t.clone() for t in [*engine.trainable, *engine.ema.teacher, engine.loss_fn.center]]

    before = snapshot()
    for step in range(2):
        engine.micro_step(poisoned, step, 1.0, sync_grads=True)
        assert engine.finish_step(step, epoch=0).skipped
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))
    engine.micro_step(random_crops(4, 1), 2, 1.0, sync_grads=True)
    assert not engine.finish_step(2, epoch=0).skipped and engine.counters.bad_streak == 0
    for step in range(3, 5):
        engine.micro_step(poisoned, step, 1.0, sync_grads=True)
        engine.finish_step(step, epoch=0)
    engine.micro_step(poisoned, 5, 1.0, sync_grads=True)
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row had a non-finite loss"):
        engine.finish_step(5, epoch=0)
    assert engine.skipped_steps == 5
