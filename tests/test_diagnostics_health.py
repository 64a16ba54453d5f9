"""Health warnings: each rule on crafted figures, and a real collapsing run against a healthy one."""
from __future__ import annotations

import json
import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dino_dist.data.demo import ensure_demo_dataset
from dino_dist.observe.health import HealthMonitor, small_batch_warning
from tests.conftest import REPO, run_train, tiny_overrides, write_image_folder

LOG_K = math.log(256)


def figures(entropy_ratio=0.5, loss=3.0, used=40, share=0.3, grad_norm=1.0, skipped=0):
    return {"entropy_ratio": entropy_ratio, "loss": loss, "loss_ratio": loss / LOG_K,
            "prototypes_used": used, "prototype_share": share, "grad_norm": grad_norm,
            "skipped_steps": skipped, "grad_scale": 128.0}


def codes(monitor, step, values):
    return [w.code for w in monitor.check(step, values)]


def test_uniform_collapse_after_window_logging_steps():
    monitor = HealthMonitor(256, window=3, precision="fp32")
    pinned = figures(entropy_ratio=0.99, loss=LOG_K * 1.001)
    assert codes(monitor, 10, pinned) == [] and codes(monitor, 20, pinned) == []
    found = monitor.check(30, pinned)
    assert [w.code for w in found] == ["uniform_collapse"]
    assert "loss.teacher_temp" in found[0].message and "center" in found[0].message
    assert codes(monitor, 40, pinned) == []  # not repeated on every line
    assert codes(monitor, 50, figures()) == []  # a healthy step resets the count


def test_a_high_entropy_alone_is_not_collapse():
    monitor = HealthMonitor(256, window=1, precision="fp32")
    assert codes(monitor, 10, figures(entropy_ratio=0.97, loss=2.0)) == []


def test_dimensional_collapse_needs_low_entropy_and_few_prototypes():
    monitor = HealthMonitor(256, window=2, precision="fp32")
    sharp_but_diverse = figures(entropy_ratio=0.02, used=50, share=0.4)
    assert codes(monitor, 10, sharp_but_diverse) == codes(monitor, 20, sharp_but_diverse) == []
    one_hot = figures(entropy_ratio=0.02, used=1, share=1 / 128)
    assert codes(monitor, 30, one_hot) == []
    found = monitor.check(40, one_hot)
    assert [w.code for w in found] == ["dimensional_collapse"]
    assert "1 prototypes" in found[0].message and "loss.center_momentum" in found[0].message
    small_batch = HealthMonitor(256, window=1, precision="fp32")  # 16 teacher rows: 2 is 12%
    assert codes(small_batch, 10, figures(entropy_ratio=0.05, used=3, share=3 / 16)) == []
    assert codes(small_batch, 20, figures(entropy_ratio=0.05, used=2, share=2 / 16)) == \
        ["dimensional_collapse"]


def patch_figures(entropy_ratio=0.5, used=40, share=0.3):
    return {**figures(), "patch_entropy_ratio": entropy_ratio, "patch_prototypes_used": used,
            "patch_prototype_share": share}


def test_ibot_patch_targets_that_collapse_are_named():
    """Uniform, or one-hot on a few prototypes, the masked-patch targets get their own
    warnings; the CLS figures stay healthy meanwhile."""
    monitor = HealthMonitor(256, window=2, precision="fp32")
    uniform = patch_figures(entropy_ratio=0.99)
    assert codes(monitor, 10, uniform) == []
    found = monitor.check(20, uniform)
    assert [w.code for w in found] == ["patch_uniform_collapse"]
    assert "sinkhorn_knopp" in found[0].message and "\n" not in found[0].message
    one_hot = patch_figures(entropy_ratio=0.01, used=2, share=0.01)
    assert codes(monitor, 30, one_hot) == []
    assert codes(monitor, 40, one_hot) == ["patch_dimensional_collapse"]
    healthy = HealthMonitor(256, window=1, precision="fp32")
    assert codes(healthy, 10, patch_figures()) == []


def test_near_collapse_is_few_prototypes_that_student_and_teacher_agree_on():
    # The demo's recipe before its study, from its sixth epoch: a handful of 1,024 prototypes
    # take the argmax of 128 teacher rows, and the student's argmax matches on most pairs.
    monitor = HealthMonitor(1024, window=3, precision="fp32", settle_steps=40)
    shortcut = figures(entropy_ratio=0.85, loss=6.0, used=5, share=5 / 128) | {"agreement": 0.85}
    assert [codes(monitor, step, shortcut) for step in (20, 40, 60, 80)] == [[]] * 4
    found = monitor.check(100, shortcut)  # the third logging step after the first epoch
    assert [w.code for w in found] == ["near_collapse"]
    assert "5 prototypes" in found[0].message and "85% of the crop pairs" in found[0].message
    assert "model.out_dim" in found[0].message
    assert codes(monitor, 120, shortcut) == []  # repeated only every few logging steps

    # A run that learns shape: as few prototypes and a flat teacher, but the student still
    # has to work out which prototype the teacher picks.
    learning = HealthMonitor(1024, window=1, precision="fp32", settle_steps=40)
    searching = figures(entropy_ratio=0.92, loss=6.3, used=4, share=4 / 128) | {"agreement": 0.3}
    assert codes(learning, 100, searching) == []
    many = figures(entropy_ratio=0.85, loss=6.0, used=13, share=13 / 128) | {"agreement": 0.9}
    assert codes(learning, 120, many) == []
    assert codes(learning, 140, figures(used=4, share=4 / 128)) == []  # no agreement figure


def test_full_collapse_is_not_also_reported_as_near_collapse():
    monitor = HealthMonitor(256, window=1, precision="fp32")
    one_hot = figures(entropy_ratio=0.02, used=1, share=1 / 128)
    assert codes(monitor, 10, one_hot) == ["dimensional_collapse"]
    pinned = figures(entropy_ratio=0.99, loss=LOG_K * 1.001, used=3, share=3 / 128)
    assert codes(monitor, 20, pinned) == ["uniform_collapse"]


def test_gradient_explosion_against_the_recent_median():
    monitor = HealthMonitor(256, window=3, precision="fp32")
    for step, norm in enumerate((2.0, 3.0, 2.5, 4.0), start=1):
        assert codes(monitor, step, figures(grad_norm=norm)) == []
    assert codes(monitor, 5, figures(grad_norm=float("nan"))) == []  # skipped steps are not it
    assert codes(monitor, 6, figures(grad_norm=27.0)) == []  # below 10x the median 2.75
    found = monitor.check(7, figures(grad_norm=400.0))
    assert [w.code for w in found] == ["grad_explosion"] and "optim.lr" in found[0].message


def test_repeated_fp16_skips_suggest_bf16():
    monitor = HealthMonitor(256, window=3, precision="fp16")
    assert codes(monitor, 20, figures(skipped=6)) == []  # the scaler calibrating: expected
    assert codes(monitor, 120, figures(skipped=8)) == []  # 2 of 100 steps
    found = monitor.check(140, figures(skipped=13))  # 5 of 20 steps
    assert [w.code for w in found] == ["fp16_skips"]
    assert "train.precision=bf16" in found[0].message
    bf16 = HealthMonitor(256, window=3, precision="bf16")
    bf16.check(120, figures(skipped=0))
    assert codes(bf16, 140, figures(skipped=10)) == []


def test_small_batch_for_teacher_momentum():
    # ImageNet-sized data: batch 64 with the default 0.996 averages 16k images, not 256k.
    warning = small_batch_warning(64, 0.996, dataset_size=1_281_167)
    assert warning is not None and "optim.teacher_momentum to >= 0.99975" in warning.message
    assert small_batch_warning(1024, 0.996, 1_281_167) is None  # the reference recipe
    assert small_batch_warning(256, 0.9995, 1_281_167) is None  # DINO's advice for 256
    assert small_batch_warning(64, 0.98, dataset_size=3200) is None  # the demo


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_collapsing_run_warns_within_a_few_logging_steps_and_a_healthy_one_never(tmp_path):
    data = write_image_folder(tmp_path / "images")
    # A teacher temperature of 1 instead of 0.04: the teacher's outputs are flat from step 1.
    hot = tmp_path / "hot"
    result = run_train(tiny_overrides(data, hot, **{
        "loss.teacher_temp": 1.0, "loss.warmup_teacher_temp": 1.0, "train.max_steps": 4,
        "log.tensorboard": "true"}))
    assert "uniform collapse" in result.stdout
    warned = [r["step"] for r in read_metrics(hot) if "uniform_collapse" in r.get("warnings", [])]
    assert warned == [3]  # the third logging step (log.collapse_window=3)
    assert "loss.teacher_temp" in (hot / "log.txt").read_text()
    assert json.loads((hot / "training_summary.json").read_text())["stop_reason"] == "max_steps"
    events = EventAccumulator(str(hot / "tb"))
    events.Reload()
    assert [e.value > 0.95 for e in events.Scalars("train/entropy_ratio")] == [True] * 4
    assert [e.step for e in events.Tensors("warnings/text_summary")] == [3]

    healthy = tmp_path / "healthy"
    result = run_train(tiny_overrides(data, healthy))
    assert "collapse" not in result.stdout
    records = read_metrics(healthy)
    assert len(records) == 8 and not any("warnings" in r for r in records)
    assert all(0.05 < r["entropy_ratio"] < 0.9 and r["prototypes_used"] > 2 for r in records)


def test_the_demo_recipe_before_its_study_warns_of_near_collapse(tmp_path):
    """The recipe and images the demo had before benchmarks/demo_sweep.py, as they were run:
    from its second epoch a flat teacher on a handful of prototypes, k-NN far below the new
    demo. Its first 240 steps of 600 must say so (the shipped demo must not: test_demo.py)."""
    images = ensure_demo_dataset(version=2, progress=False)
    run_dir = tmp_path / "before"
    result = run_train([f"data.path={images / 'train'}", f"eval.train_path={images / 'train'}",
                        f"eval.val_path={images / 'val'}", "train.max_steps=240",
                        f"train.output_dir={run_dir}"],
                       config=str(REPO / "tests" / "configs" / "demo_near_collapse.yaml"),
                       timeout=900)
    warned = {w for r in read_metrics(run_dir) for w in r.get("warnings", [])}
    assert "near_collapse" in warned, read_metrics(run_dir)
    assert "near collapse" in result.stdout
