"""Typed run configuration: YAML file, then dotted `key=value` overrides, then validation.

Every section is a dataclass, so a typo or a wrong type is caught before any process group
or data loader starts, with a message naming the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dino_dist.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@dataclass
class DataConfig:
    path: str = "demo"
    num_workers: int = 4
    prefetch_factor: int = 2
    global_crops_number: int = 2
    global_crop_size: int = 224
    global_crops_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crops_number: int = 10
    local_crop_size: int = 96
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    # Gaussian-blur sigma range in pixels; the paper's (0.1, 2.0) is meant for 224 px crops,
    # so small-image runs scale it down with the crop size.
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # Augment the crops of one size as one batch: ~2x the images/s per loader worker of one
    # transforms.v2 chain per crop (false), the same recipe, another random stream.
    batched_crops: bool = True
    demo_dir: str = ""


@dataclass
class ModelConfig:
    arch: str = "vit_small"
    patch_size: int = 16
    # Resolution the ViT's position table is stored at (other sizes are interpolated);
    # 224 keeps official checkpoints loadable, small-image runs set their crop size.
    img_size: int = 224
    drop_path_rate: float = 0.1
    out_dim: int = 65536
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256


@dataclass
class OptimConfig:
    batch_size_per_gpu: int = 64
    accum_steps: int = 1
    lr: float = 0.0005  # for a total batch of 256; scaled linearly by the real total batch
    min_lr: float = 1e-6
    # After warm-up: cosine (DINO) | linear | cosine_restarts | polynomial | constant_after_decay
    lr_schedule: str = "cosine"
    lr_cycle_epochs: int = 0  # cosine_restarts: epochs per cycle
    lr_power: float = 2.0  # polynomial: exponent of the decay
    lr_decay_epochs: int = 0  # constant_after_decay: epochs of cosine decay, then min_lr
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # 0 disables clipping
    clip_mode: str = "per_param"  # DINO's per-parameter clipping, or "global" norm
    freeze_last_layer: int = 1  # epochs during which the head's last layer is not updated
    teacher_momentum: float = 0.996
    teacher_momentum_end: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class LossConfig:
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9


@dataclass
class EarlyStoppingConfig:
    """Stop when the periodic evaluation's metric has not improved for `patience` evaluations."""
    enabled: bool = False
    metric: str = "knn_top1"  # knn_top1 | knn_top5 | val_loss (see eval.every_epochs)
    mode: str = "auto"  # auto (max for k-NN, min for losses) | max | min
    patience: int = 3  # evaluations without an improvement of more than min_delta
    min_delta: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: int = 0  # stop after this many optimizer steps; 0 = no limit
    seed: int = 0
    precision: str = "fp32"
    parallel: str = "ddp"
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs/dino"
    # A collective that waits longer than this fails (a rank died or hangs) instead of hanging
    # forever. Start-up (data scan, demo generation) gets at least 30 min. It must exceed the
    # time rank 0 needs to write one checkpoint, since the other ranks wait for it.
    dist_timeout_s: int = 600
    max_nonfinite_steps: int = 10  # skipped non-finite steps in a row before the run stops
    compile: bool = False  # torch.compile each transformer block (or ResNet stage)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = only at epoch ends and at the end of the run
    keep_last: int = 3  # newest checkpoints kept; older ones go once a new one is committed
    keep_every_epochs: int = 0  # also keep the epoch-end checkpoint of every N-th epoch
    resume: bool = True  # resume from the newest valid checkpoint in train.output_dir
    resume_from: str = ""  # a checkpoint file to start from instead
    # Sharded (FSDP) checkpoints only: training waits for the copy to host memory, not for
    # the write; the next save waits for the previous one to be committed.
    async_save: bool = False


@dataclass
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    # A collapse warning needs this many logging steps in a row that look collapsed.
    collapse_window: int = 3


@dataclass
class EvalConfig:
    knn_at_end: bool = False  # the demo turns this on
    train_path: str = ""  # labelled ImageFolder roots; empty with data.path=demo = demo splits
    val_path: str = ""
    knn_k: int = 20
    knn_temperature: float = 0.07
    image_size: int = 224
    batch_size: int = 64
    every_epochs: int = 0  # evaluate during training every N epochs; 0 = off
    # Held-out images (any folder layout) for a validation DINO loss; "" = the demo's val
    # split with data.path=demo, else no validation loss.
    val_loss_path: str = ""
    best_metric: str = "auto"  # kept in checkpoints/best/: knn_top1 | knn_top5 | val_loss | auto


@dataclass
class SlurmConfig:
    """Cluster defaults for launch/submit.py (its options win); training reads max_requeues."""
    partition: str = ""  # "" = the cluster's default partition; same for account/qos/constraint
    account: str = ""
    qos: str = ""
    constraint: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0 = one per GPU, or one per node without GPUs
    cpus_per_task: int = 0  # 0 = the cluster's default
    mem_gb: int = 0  # 0 = the cluster's default
    timeout_min: int = 1440
    signal_delay_s: int = 120  # USR2 this long before the time limit: enough for one step + save
    max_requeues: int = 20  # the job requeues itself after a signal at most this many times
    job_name: str = "dino"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.parallel": ("ddp", "fsdp"),
    "train.device": ("auto", "cpu", "cuda"),
    "optim.clip_mode": ("per_param", "global"),
    "optim.lr_schedule": ("cosine", "linear", "cosine_restarts", "polynomial",
                          "constant_after_decay"),
    "eval.best_metric": ("auto", "knn_top1", "knn_top5", "val_loss"),
    "train.early_stopping.metric": ("knn_top1", "knn_top5", "val_loss"),
    "train.early_stopping.mode": ("auto", "max", "min"),
}
POSITIVE = (
    "optim.batch_size_per_gpu", "optim.accum_steps", "train.epochs", "model.out_dim",
    "model.patch_size", "model.img_size", "data.global_crops_number", "data.global_crop_size",
    "data.local_crop_size", "log.every_steps", "eval.knn_k", "eval.batch_size",
    "loss.student_temp", "loss.teacher_temp", "loss.warmup_teacher_temp", "eval.image_size",
    "eval.knn_temperature", "model.head_hidden_dim", "model.head_bottleneck_dim",
    "checkpoint.keep_last", "train.dist_timeout_s", "optim.lr_power", "log.collapse_window",
    "train.early_stopping.patience",
)
NON_NEGATIVE = (
    "train.max_steps", "checkpoint.every_steps", "data.num_workers", "data.local_crops_number",
    "optim.lr", "optim.min_lr", "optim.warmup_epochs", "optim.clip_grad",
    "optim.freeze_last_layer", "optim.weight_decay", "optim.weight_decay_end",
    "loss.warmup_teacher_temp_epochs", "model.drop_path_rate", "train.seed",
    "checkpoint.keep_every_epochs", "train.max_nonfinite_steps", "optim.lr_cycle_epochs",
    "optim.lr_decay_epochs", "eval.every_epochs", "train.early_stopping.min_delta",
)
POSITIVE += ("slurm.nodes", "slurm.timeout_min")
NON_NEGATIVE += ("slurm.gpus_per_node", "slurm.tasks_per_node", "slurm.cpus_per_task",
                 "slurm.mem_gb", "slurm.signal_delay_s", "slurm.max_requeues")
UNIT_INTERVAL = (
    "loss.center_momentum", "optim.teacher_momentum", "optim.teacher_momentum_end",
)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a Config from a YAML file (the demo when None) and dotted overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found: pass --config with an existing "
                          f"YAML file, e.g. configs/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML ({first}): fix the syntax")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, "
                          f"e.g. 'train: {{epochs: 10}}'")
    cfg = Config()
    for section, values in raw.items():
        if not isinstance(values, dict):
            _section_of(cfg, section)
            raise ConfigError(f"config section '{section}' must be a mapping of keys")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
    for word in overrides or []:
        apply_override(cfg, word)
    validate(cfg)
    return cfg


def apply_override(cfg: Config, word: str) -> None:
    key, sep, text = word.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{word}' is not of the form key=value, "
                          f"e.g. optim.lr=1e-4")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    set_value(cfg, key.strip(), value)


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) < 2:
        raise ConfigError(f"config key '{dotted}' must be section.key, e.g. optim.lr")
    target = _section_of(cfg, parts[0])
    for depth in range(1, len(parts)):
        names = {f.name for f in dataclasses.fields(target)}
        if parts[depth] not in names:
            prefix = ".".join(parts[:depth])
            valid = [f"{prefix}.{n}" for n in names]
            raise ConfigError(f"unknown config key '{dotted}'{_did_you_mean(dotted, valid)}")
        hint = typing.get_type_hints(type(target))[parts[depth]]
        if dataclasses.is_dataclass(hint):  # a sub-section, e.g. train.early_stopping
            if depth == len(parts) - 1:
                _set_subsection(cfg, dotted, value)
                return
            target = getattr(target, parts[depth])
        elif depth < len(parts) - 1:
            raise ConfigError(f"config key '{'.'.join(parts[:depth + 1])}' has no sub-keys: "
                              f"write {'.'.join(parts[:depth + 1])}=VALUE")
    setattr(target, parts[-1], _coerce(dotted, value, hint))


def _set_subsection(cfg: Config, dotted: str, values: Any) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{dotted}' is a section: set its keys, "
                          f"e.g. {dotted}.<key>=VALUE, or give a mapping")
    for key, value in values.items():
        set_value(cfg, f"{dotted}.{key}", value)


def _section_of(cfg: Config, name: str) -> Any:
    sections = [f.name for f in dataclasses.fields(cfg)]
    if name not in sections:
        raise ConfigError(f"unknown config section '{name}'{_did_you_mean(name, sections)}")
    return getattr(cfg, name)


def _did_you_mean(word: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.5)
    return f": did you mean '{close[0]}'?" if close else f": valid keys are {', '.join(valid)}"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (list, types.GenericAlias) or hint is list:
        (item_type,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}: "
                              f"write it as [a, b]")
        return [_coerce(key, v, item_type) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    return value


def validate(cfg: Config) -> None:
    from dino_dist.models import ARCH_NAMES  # models import torch; keep config import light

    for key, allowed in CHOICES.items():
        _check(cfg, key, lambda v: v in allowed, f"must be one of {', '.join(allowed)}")
    _check(cfg, "model.arch", lambda v: v in ARCH_NAMES, f"must be one of {', '.join(ARCH_NAMES)}")
    for key in POSITIVE:
        _check(cfg, key, lambda v: v > 0, "must be > 0")
    for key in NON_NEGATIVE:
        _check(cfg, key, lambda v: v >= 0, "must be >= 0")
    for key in UNIT_INTERVAL:
        _check(cfg, key, lambda v: 0 <= v <= 1, "must be between 0 and 1")
    for key in ("data.global_crops_scale", "data.local_crops_scale"):
        _check(cfg, key, lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
               "must be [low, high] with 0 < low <= high <= 1")
    _check(cfg, "data.blur_sigma", lambda v: len(v) == 2 and 0 < v[0] <= v[1],
           "must be [low, high] with 0 < low <= high")
    _check(cfg, "optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
           "must be [beta1, beta2] with each in [0, 1)")
    if cfg.model.arch.startswith("vit"):
        for key in ("data.global_crop_size", "data.local_crop_size"):
            _check(cfg, key, lambda v: v % cfg.model.patch_size == 0,
                   f"must be a multiple of model.patch_size ({cfg.model.patch_size})")
    _validate_lr_schedule(cfg)
    if bool(cfg.eval.train_path) != bool(cfg.eval.val_path):
        raise ConfigError("eval.train_path and eval.val_path go together (labelled ImageFolder "
                          "trees for k-NN): set both, or neither")
    if cfg.data.global_crops_number + cfg.data.local_crops_number < 2:
        raise ConfigError("DINO needs at least 2 crops: raise data.global_crops_number "
                          "or data.local_crops_number")


def _validate_lr_schedule(cfg: Config) -> None:
    needs = {"cosine_restarts": "optim.lr_cycle_epochs", "constant_after_decay": "optim.lr_decay_epochs"}
    key = needs.get(cfg.optim.lr_schedule)
    if key is not None:
        _check(cfg, key, lambda v: v > 0, f"must be > 0 with optim.lr_schedule="
                                          f"{cfg.optim.lr_schedule}")


def _check(cfg: Config, key: str, ok, requirement: str) -> None:
    value = cfg
    for name in key.split("."):
        value = getattr(value, name)
    if not ok(value):
        raise ConfigError(f"config key '{key}' {requirement}, got {value!r}")


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (as stored in checkpoints)."""
    cfg = Config()
    for section, values in raw.items():
        for key, value in values.items():
            try:
                set_value(cfg, f"{section}.{key}", value)
            except ConfigError:
                continue  # a key from another version: keep this version's default
    return cfg
