"""Every rule that the config alone decides is checked when it loads: one line naming the key,
the value and the fix, and `dino-train` exits 2 before any process group or run directory
exists. Only what needs the data or the machine is left for later."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch.distributed as dist

from dino_dist.cli.train import main
from dino_dist.config import ConfigError, load_config
from tests.conftest import subprocess_env

# Never read: each config below is refused before any folder is looked at. Outside the demo,
# nothing is measured by a periodic evaluation unless a path says where.
ELSEWHERE = "data.path=/nowhere/train"
EVALUATED = [ELSEWHERE, "eval.every_epochs=1"]

RULES = [
    pytest.param(["train.early_stopping.enabled=true", "eval.every_epochs=0"],
                 "train.early_stopping.enabled=true needs periodic evaluation: set "
                 "eval.every_epochs to 1 or more", id="early-stopping-without-evaluation"),
    pytest.param([*EVALUATED, "train.early_stopping.enabled=true",
                  "train.early_stopping.metric=val_loss"],
                 "train.early_stopping.metric=val_loss is never measured: set "
                 "eval.val_loss_path (held-out images), or choose one of: none available",
                 id="early-stopping-metric-not-measured"),
    pytest.param([*EVALUATED, "eval.val_loss_path=/nowhere/val", "eval.best_metric=knn_top5"],
                 "eval.best_metric=knn_top5 is never measured: set eval.train_path and "
                 "eval.val_path (labelled ImageFolder trees), or choose one of: val_loss",
                 id="best-metric-not-measured"),
    pytest.param(["data.num_workers=2", "data.prefetch_factor=0"],
                 "config key 'data.prefetch_factor' must be >= 1 with data.num_workers=2 (or "
                 "set data.num_workers=0), got 0", id="prefetch-factor"),
    pytest.param(["data.num_workers=-1"], "config key 'data.num_workers' must be >= 0, got -1",
                 id="num-workers"),
    pytest.param(["optim.batch_size_per_gpu=0"],
                 "config key 'optim.batch_size_per_gpu' must be > 0, got 0", id="batch-size"),
    pytest.param(["data.global_crops_number=0"],
                 "config key 'data.global_crops_number' must be > 0, got 0", id="global-crops"),
    pytest.param(["data.local_crop_size=0"],
                 "config key 'data.local_crop_size' must be > 0, got 0", id="local-crop-size"),
    pytest.param(["data.local_crops_scale=[0.5, 1.5]"],
                 "config key 'data.local_crops_scale' must be [low, high] with 0 < low <= high "
                 "<= 1, got [0.5, 1.5]", id="local-crops-scale"),
    pytest.param(["model.img_size=100"],  # the demo's patches are 8 px
                 "config key 'model.img_size' must be a multiple of model.patch_size (8), "
                 "got 100", id="img-size-in-patches"),
    pytest.param(["eval.attention_images=/nowhere/few", "model.arch=resnet50"],
                 "eval.attention_images is set, but model.arch=resnet50 has no attention: "
                 "leave eval.attention_images empty", id="attention-without-vit"),
    pytest.param(["eval.attention_images=/nowhere/few", "log.tensorboard=false"],
                 "eval.attention_images draws its grid to TensorBoard (or W&B), but "
                 "log.tensorboard=false: set log.tensorboard=true, or leave "
                 "eval.attention_images empty", id="attention-without-tensorboard"),
    pytest.param(["slurm.timeout_min=2", "slurm.signal_delay_s=120"],
                 "slurm.signal_delay_s=120 (--signal-delay-s) is not shorter than "
                 "slurm.timeout_min=2 minutes (--timeout-min): the job would be signalled "
                 "before it starts; raise the timeout or lower the delay", id="signal-delay"),
]


@pytest.fixture
def own_signal_handlers():
    """main() takes over the stop signals; give them back to pytest afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("overrides, message", RULES)
def test_a_rule_of_the_config_alone_stops_dino_train_at_load(overrides, message, tmp_path,
                                                             capsys, own_signal_handlers):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value) == message
    run_dir = tmp_path / "run"
    assert main([*overrides, f"train.output_dir={run_dir}"]) == 2
    assert capsys.readouterr().err == f"dino-train: error: {message}\n"
    assert not run_dir.exists() and not dist.is_initialized()


@pytest.mark.parametrize("overrides", [
    pytest.param(["data.num_workers=0", "data.prefetch_factor=0"], id="no-loader-processes"),
    pytest.param(["eval.every_epochs=1", "train.early_stopping.enabled=true",
                  "train.early_stopping.metric=val_loss", "eval.best_metric=knn_top5"],
                 id="the-demo-measures-both"),
    pytest.param([*EVALUATED, "eval.train_path=/nowhere/a", "eval.val_path=/nowhere/b",
                  "train.early_stopping.enabled=true"], id="labelled-folders-give-knn"),
    pytest.param([ELSEWHERE, "eval.every_epochs=0", "eval.best_metric=val_loss"],
                 id="best-metric-never-evaluated"),
    pytest.param(["eval.attention_images=/nowhere/few", "log.tensorboard=false",
                  "log.wandb=true"], id="attention-to-wandb"),
    pytest.param(["model.arch=resnet50", "model.img_size=100"], id="resnet-has-no-patches"),
])
def test_settings_the_rules_allow_still_load(overrides):
    load_config(None, overrides)


def test_the_process_exits_2_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "dino_dist.train", "train.early_stopping.enabled=true",
         "eval.every_epochs=0", f"train.output_dir={run_dir}"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"dino-train: error: {RULES[0].values[1]}"]
    assert not run_dir.exists()
