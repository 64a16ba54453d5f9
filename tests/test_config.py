"""Config loading, overrides, and the one-line messages for user mistakes."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

import dino_dist.models
from dino_dist import config
from dino_dist.config import Config, ConfigError, dump_config, load_config
from tests.conftest import REPO, subprocess_env


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.001, batch_size_per_gpu: 32}\nmodel: {arch: vit_tiny}\n")
    cfg = load_config(path, ["optim.lr=1e-4", "train.epochs=3", "data.global_crops_scale=[0.5, 1]"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.batch_size_per_gpu == 32
    assert cfg.model.arch == "vit_tiny"
    assert cfg.train.epochs == 3
    assert cfg.data.global_crops_scale == [0.5, 1.0]


def test_default_is_the_demo():
    cfg = load_config(None)
    assert cfg.data.path == "demo" and cfg.eval.knn_at_end


def assert_holds(section, values: dict, where: str = "") -> None:
    """Every value a YAML tree sets is the value the loaded config section holds."""
    for key, value in values.items():
        held = getattr(section, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(held):
            assert_holds(held, value, f"{where}{key}.")
        else:
            assert held == value, f"{where}{key}: the file says {value!r}, the config holds {held!r}"


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load_with_every_value_they_set(config):
    path = REPO / "configs" / config
    assert_holds(load_config(path), yaml.safe_load(path.read_text()))


def test_paper_recipe_values():
    cfg = load_config(REPO / "configs" / "vit_small_16.yaml")
    assert (cfg.data.global_crop_size, cfg.data.local_crops_number, cfg.data.local_crop_size) == (224, 10, 96)
    assert cfg.model.out_dim == 65536 and cfg.optim.batch_size_per_gpu == 64
    assert cfg.optim.lr == 0.0005 and cfg.optim.warmup_epochs == 10 and cfg.optim.min_lr == 1e-6
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.4)
    assert (cfg.optim.teacher_momentum, cfg.optim.teacher_momentum_end) == (0.996, 1.0)
    assert (cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
            cfg.loss.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert cfg.loss.student_temp == 0.1 and cfg.loss.center_momentum == 0.9
    assert cfg.optim.clip_grad == 3.0 and cfg.optim.freeze_last_layer == 1


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1", "unknown config key 'optim.lrr': did you mean 'optim.lr'?"),
    ("optimm.lr=1", "unknown config section 'optimm': did you mean 'optim'?"),
    ("optim.batch_size_per_gpu=abc", "config key 'optim.batch_size_per_gpu' must be an integer, got 'abc'"),
    ("optim.lr=fast", "config key 'optim.lr' must be a number, got 'fast'"),
    ("train.precision=fp8", "config key 'train.precision' must be one of fp32, bf16, fp16, got 'fp8'"),
    ("optim.batch_size_per_gpu=0", "config key 'optim.batch_size_per_gpu' must be > 0, got 0"),
    ("model.arch=vit_huge", "config key 'model.arch' must be one of"),
    ("loss.center_momentum=1.5", "config key 'loss.center_momentum' must be between 0 and 1"),
    ("log.tensorboard=maybe", "config key 'log.tensorboard' must be true or false"),
    ("optim.lr=-1", "config key 'optim.lr' must be >= 0, got -1.0"),
    ("train.early_stopping.mode=up", "config key 'train.early_stopping.mode' must be one of "
                                     "auto, max, min, got 'up'"),
    ("data.global_crops_scale=[0.5, 0.2]", "config key 'data.global_crops_scale' must be "
                                           "[low, high] with 0 < low <= high <= 1, got [0.5, 0.2]"),
    ("data.blur_sigma=[0, 1]", "config key 'data.blur_sigma' must be [low, high] with "
                               "0 < low <= high, got [0.0, 1.0]"),
    ("optim.betas=[0.9, 1]", "config key 'optim.betas' must be [beta1, beta2] with each in [0, 1)"),
    ("optim.lr_schedule=cosine_restarts", "config key 'optim.lr_cycle_epochs' must be > 0 with "
                                          "optim.lr_schedule=cosine_restarts, got 0"),
    ("eval.train_path=/labelled", "eval.train_path and eval.val_path go together"),
    ("data.local_crops_scale=0.3", "config key 'data.local_crops_scale' must be a list"),
    ("lr", "override 'lr' is not of the form key=value"),
    ("loss.centering=swav", "config key 'loss.centering' must be one of center, sinkhorn_knopp"),
    ("ibot.mask_ratio=[0.6, 0.2]", "config key 'ibot.mask_ratio' must be [low, high]"),
    ("ibot.out_dim=1024", "ibot.out_dim=1024 sizes a separate patch head"),
    ("model.num_registers=20", "config key 'model.num_registers' must be between 0 and 16"),
    ("optim.layerwise_decay=0", "config key 'optim.layerwise_decay' must be in (0, 1]"),
])
def test_user_mistakes_get_one_line_messages(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_crop_size_must_fit_patch():
    with pytest.raises(ConfigError, match="multiple of model.patch_size"):
        load_config(None, ["data.global_crop_size=30"])
    load_config(None, ["model.arch=resnet50", "data.global_crop_size=30"])  # no patches


def test_at_least_two_crops():
    with pytest.raises(ConfigError, match="DINO needs at least 2 crops"):
        load_config(None, ["data.global_crops_number=1", "data.local_crops_number=0"])


def test_arch_names_match_the_models_table():
    # config keeps its own copy so that it never imports the models (and torch).
    assert set(config.ARCH_NAMES) == set(dino_dist.models.ARCH_NAMES)


def test_config_imports_no_other_dino_dist_module():
    code = ("import sys, dino_dist.config; "
            "print(sorted(m for m in sys.modules if m.startswith(('dino_dist', 'torch'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["['dino_dist',", "'dino_dist.config',", "'dino_dist.errors']"]


def test_list_defaults_are_not_shared():
    first, second = Config(), Config()
    first.data.global_crops_scale[0] = 0.9
    assert second.data.global_crops_scale == [0.4, 1.0]


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_config(path)


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["optim.lr=0.003"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.003


def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dino_dist.train", "optim.lrr=1"],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("dino-train: error: unknown config key 'optim.lrr': "
                                     "did you mean 'optim.lr'?")
    assert "Traceback" not in result.stderr


def test_cli_missing_data_folder(tmp_path):
    missing = tmp_path / "nope"
    result = subprocess.run([sys.executable, "-m", "dino_dist.train", f"data.path={missing}"],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "data.path" in lines[0]


@pytest.mark.parametrize("override", ["ibot.weight=1", "model.layerscale=1e-5",
                                      "model.num_registers=4", "model.ffn=swiglu"])
def test_vit_only_dinov2_parts_refuse_a_resnet(override):
    with pytest.raises(ConfigError, match="needs a ViT arch") as info:
        load_config(None, ["model.arch=resnet50", override])
    assert "\n" not in str(info.value)
