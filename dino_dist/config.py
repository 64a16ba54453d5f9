"""Typed run configuration: YAML file, then dotted `key=value` overrides, then validation.

Every section is a dataclass, so a typo or a wrong type is caught before any process group
or data loader starts, with a message naming the key and the closest valid one. Each field
carries its own rule (`choice`, `positive`, ...: dataclass field metadata) and the rules that
tie fields together sit right after their section; `validate` applies both. Every rule the
config alone decides lives here, once; only what needs the data or the machine (a folder
exists, its images decode, CUDA is there) is checked later, where that becomes known. The
comments beside the fields are their documentation: `key_docs` reads them for
`dino-train --help`.

This is the bottom layer: it imports nothing from dino_dist but the errors, so the names
other packages also know (ARCH_NAMES, LR_SCHEDULES, EVAL_METRICS) are defined here.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from dino_dist.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

# dino_dist.models keeps its own table (and imports torch, which config must not); a test
# checks the two name the same archs.
ARCH_NAMES = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2", "vit_mini", "resnet50")
LR_SCHEDULES = ("cosine", "linear", "cosine_restarts", "polynomial", "constant_after_decay")
# What a periodic evaluation reports: eval.best_metric and train.early_stopping.metric.
EVAL_METRICS = ("knn_top1", "knn_top5", "val_loss")

_RULE = "rule"  # the field-metadata key holding (check, requirement)


def ruled(default: Any, rule: Callable[[Any], bool], requirement: str) -> Any:
    """A field that `validate` checks with `rule`; the error reads
    "config key 'KEY' <requirement>, got VALUE"."""
    metadata = {_RULE: (rule, requirement)}
    if isinstance(default, list):  # each Config needs its own list, not a shared one
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def choice(default: str, allowed: tuple[str, ...]) -> Any:
    return ruled(default, lambda v: v in allowed, f"must be one of {', '.join(allowed)}")


def positive(default: float) -> Any:
    return ruled(default, lambda v: v > 0, "must be > 0")


def non_negative(default: float) -> Any:
    return ruled(default, lambda v: v >= 0, "must be >= 0")


def unit_interval(default: float) -> Any:
    return ruled(default, lambda v: 0 <= v <= 1, "must be between 0 and 1")


def low_high(default: list[float], ceiling: float | None = None) -> Any:
    """A [low, high] range with 0 < low <= high, and high <= ceiling when one is given."""
    top = math.inf if ceiling is None else ceiling
    bound = "" if ceiling is None else f" <= {ceiling}"
    return ruled(default, rule=lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= top,
                 requirement=f"must be [low, high] with 0 < low <= high{bound}")


def _require(key: str, value: Any, ok: Callable[[Any], bool], requirement: str) -> None:
    if not ok(value):
        raise ConfigError(f"config key '{key}' {requirement}, got {value!r}")


@dataclass
class DataConfig:
    # An ImageFolder root, a plain folder of images, demo (built-in), or a shard set: a folder
    # of .tar shards, a brace pattern of them (/data/set/{000000..000099}.tar) or s3://bucket/prefix
    # (endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)
    path: str = "demo"
    # The epoch order: "random" shuffles the whole set (a folder by a stored permutation, a
    # shard set by one computed on demand, never held in memory); "shard_windows" (shard sets
    # only) shuffles the shards and mixes samples within windows of data.window_shards shards,
    # so reads stay in a few shards at a time (disks, NFS) at the cost of less mixed batches.
    order: str = choice("random", ("random", "shard_windows"))
    window_shards: int = positive(16)  # shards mixed together with data.order=shard_windows
    read_threads: int = positive(16)  # concurrent ranged reads per loader process (shard sets)
    # Seconds a failing shard read is retried (backoff 0.2 s doubling) before the run stops
    # with one line naming the shard; it resumes from its last checkpoint when restarted
    read_retry_s: float = non_negative(30.0)
    # Where a remote shard index is copied (memory-mapped from there); "" = ~/.cache/dino_dist
    index_cache: str = ""
    num_workers: int = non_negative(4)  # loader processes per rank; 0 = load in the trainer
    # Batches each loader process prepares ahead; must be >= 1 when num_workers > 0
    prefetch_factor: int = 2
    global_crops_number: int = positive(2)  # large crops per image; the teacher sees only these
    global_crop_size: int = positive(224)  # side of a global crop in pixels
    # A global crop's area as a fraction of the image's: drawn from [low, high]
    global_crops_scale: list[float] = low_high([0.4, 1.0], ceiling=1)
    local_crops_number: int = non_negative(10)  # small crops per image, for the student only
    local_crop_size: int = positive(96)  # side of a local crop in pixels
    # A local crop's area as a fraction of the image's: drawn from [low, high]
    local_crops_scale: list[float] = low_high([0.05, 0.4], ceiling=1)
    # Gaussian-blur sigma range in pixels; the paper's (0.1, 2.0) is meant for 224 px crops,
    # so small-image runs scale it down with the crop size.
    blur_sigma: list[float] = low_high([0.1, 2.0])
    # augment_on=cpu: true augments each crop size's crops as one stack, 1.4-2.1x the images/s
    # per loader worker of false (one transforms.v2 chain per crop, the demo's random stream).
    # Same recipe either way; data/recipe.py says which path is used when.
    batched_crops: bool = True
    # Where the multi-crop augmentation runs: "cpu" in the loader processes, or "gpu" on the
    # training device, batched over all images of a micro-batch (loader processes then only
    # read and decode; on a CPU-only run "gpu" means the main process). Same recipe.
    augment_on: str = choice("cpu", ("cpu", "gpu"))
    # Where the demo images are made; "" = $DINO_DIST_CACHE/demo or ~/.cache/dino_dist/demo
    demo_dir: str = ""


def _check_prefetch(data: DataConfig) -> None:
    # Without loader processes nothing is prefetched, so any value is harmless there.
    if data.num_workers > 0:
        _require("data.prefetch_factor", data.prefetch_factor, lambda v: v >= 1,
                 f"must be >= 1 with data.num_workers={data.num_workers} (or set "
                 f"data.num_workers=0)")


def _check_crop_count(data: DataConfig) -> None:
    # The loss pairs each teacher crop with the student's other crops: one crop has none.
    if data.global_crops_number + data.local_crops_number < 2:
        raise ConfigError("DINO needs at least 2 crops: raise data.global_crops_number "
                          "or data.local_crops_number")


@dataclass
class ModelConfig:
    arch: str = choice("vit_small", ARCH_NAMES)  # the backbone
    patch_size: int = positive(16)  # ViT patch side in pixels
    # Resolution the ViT's position table is stored at (other sizes are interpolated);
    # 224 keeps official checkpoints loadable, small-image runs set their crop size.
    img_size: int = positive(224)
    drop_path_rate: float = non_negative(0.1)  # stochastic depth of the student (not the teacher)
    out_dim: int = positive(65536)  # prototypes: the width of the DINO head's output
    use_bn_in_head: bool = False  # BatchNorm between the head's MLP layers
    norm_last_layer: bool = True  # freeze the head's last-layer norm at 1 (steadier training)
    head_hidden_dim: int = positive(2048)  # width of the head's MLP
    head_bottleneck_dim: int = positive(256)  # width before the head's last layer
    # ViTs: run the student's global and local crops as one packed batch of sequences with
    # block-diagonal attention (one pass through every layer) instead of one pass per crop
    # resolution. Same outputs; which is faster depends on the device and the model.
    packed_crops: bool = False
    # ViTs, as DINOv2: LayerScale on both residual branches, initialised to this value
    # (DINOv2: 1e-5); 0 = off
    layerscale: float = non_negative(0.0)
    # Register tokens after the CLS token ("Vision Transformers Need Registers"; DINOv2 uses 4)
    num_registers: int = ruled(0, lambda v: 0 <= v <= 16, "must be between 0 and 16")
    ffn: str = choice("mlp", ("mlp", "swiglu"))  # the blocks' feed-forward: GELU MLP or SwiGLU
    # One stochastic-depth rate for every block (DINOv2) instead of rising with depth (DINO)
    drop_path_uniform: bool = False


def _check_dinov2_backbone(model: ModelConfig) -> None:
    # LayerScale, registers and SwiGLU are transformer parts: a ResNet has none of them.
    if model.arch.startswith("vit"):
        return
    for key, value, off in (("layerscale", model.layerscale, 0.0),
                            ("num_registers", model.num_registers, 0), ("ffn", model.ffn, "mlp")):
        if value != off:
            raise ConfigError(f"model.{key}={value} needs a ViT arch, not model.arch="
                              f"{model.arch}: set model.{key}={off}")


def _check_packed_crops(model: ModelConfig) -> None:
    # Packing lays crops out as token rows: only a ViT has tokens.
    if model.packed_crops and not model.arch.startswith("vit"):
        raise ConfigError(f"model.packed_crops=true needs a ViT arch, not model.arch="
                          f"{model.arch}: set model.packed_crops=false")


def _check_crops_fit_patches(model: ModelConfig, data: DataConfig) -> None:
    # A ViT cuts each crop into patch_size x patch_size tiles; ResNets take any size.
    if not model.arch.startswith("vit"):
        return
    sizes = {"data.global_crop_size": data.global_crop_size,
             "data.local_crop_size": data.local_crop_size, "model.img_size": model.img_size}
    for key, size in sizes.items():
        _require(key, size, lambda v: v % model.patch_size == 0,
                 f"must be a multiple of model.patch_size ({model.patch_size})")


@dataclass
class OptimConfig:
    batch_size_per_gpu: int = positive(64)  # images per micro-batch on each rank
    accum_steps: int = positive(1)  # micro-batches per optimizer step
    # Peak learning rate for a total batch of 256; scaled linearly by the real total batch
    lr: float = non_negative(0.0005)
    # How lr follows the total batch: linear_256 = lr x batch / 256 (DINO); sqrt_1024 =
    # lr x sqrt(batch / 1024) (DINOv2's base_lr)
    lr_scaling: str = choice("linear_256", ("linear_256", "sqrt_1024"))
    # ViTs: block i's learning rate is lr x layerwise_decay^(depth - i) (embeddings: depth + 1,
    # head: 1); 1 = the same lr everywhere (DINO). DINOv2: 0.9 for ViT-S/B, 1.0 for ViT-L.
    layerwise_decay: float = ruled(1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")
    patch_embed_lr_mult: float = positive(1.0)  # the patch embedding's lr factor (DINOv2: 0.2)
    min_lr: float = non_negative(1e-6)  # learning rate at the end of the schedule
    # After warm-up: cosine (DINO) | linear | cosine_restarts | polynomial | constant_after_decay
    lr_schedule: str = choice("cosine", LR_SCHEDULES)
    lr_cycle_epochs: int = non_negative(0)  # cosine_restarts: epochs per cycle
    lr_power: float = positive(2.0)  # polynomial: exponent of the decay
    # constant_after_decay: epochs of cosine decay, then min_lr
    lr_decay_epochs: int = non_negative(0)
    warmup_epochs: int = non_negative(10)  # linear learning-rate warm-up from 0
    weight_decay: float = non_negative(0.04)  # at the start, a cosine to weight_decay_end
    weight_decay_end: float = non_negative(0.4)  # weight decay at the end of training
    clip_grad: float = non_negative(3.0)  # the gradient-norm limit; 0 disables clipping
    # DINO's per-parameter clipping, or "global" norm
    clip_mode: str = choice("per_param", ("per_param", "global"))
    # Epochs during which the head's last layer is not updated
    freeze_last_layer: int = non_negative(1)
    # EMA momentum of the teacher at the start; a cosine to teacher_momentum_end
    teacher_momentum: float = unit_interval(0.996)
    teacher_momentum_end: float = unit_interval(1.0)  # the teacher's at the end of training
    # AdamW's betas
    betas: list[float] = ruled([0.9, 0.999],
                               rule=lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                               requirement="must be [beta1, beta2] with each in [0, 1)")


# The schedules whose shape is undefined without an epoch count of their own.
_SCHEDULE_EPOCHS = {"cosine_restarts": "lr_cycle_epochs", "constant_after_decay": "lr_decay_epochs"}


def _check_schedule_epochs(optim: OptimConfig) -> None:
    name = _SCHEDULE_EPOCHS.get(optim.lr_schedule)
    if name is not None:
        _require(f"optim.{name}", getattr(optim, name), lambda v: v > 0,
                 f"must be > 0 with optim.lr_schedule={optim.lr_schedule}")


@dataclass
class LossConfig:
    """The DINO loss: student and teacher temperatures (the teacher's warmed up per epoch) and
    the center's EMA momentum."""
    student_temp: float = positive(0.1)  # softmax temperature of the student's output
    # The teacher's softmax temperature at the start, linear to teacher_temp
    warmup_teacher_temp: float = positive(0.04)
    teacher_temp: float = positive(0.04)  # the teacher's temperature after its warm-up
    warmup_teacher_temp_epochs: int = non_negative(0)  # epochs of the teacher-temp warm-up
    # EMA momentum of the center subtracted from the teacher's output (against collapse)
    center_momentum: float = unit_interval(0.9)
    # How the teacher's outputs are balanced over the prototypes: "center" (DINO: an EMA
    # center subtracted) or "sinkhorn_knopp" (DINOv2: an equipartition of the whole optimizer
    # step's batch, all ranks and micro-batches together). Also serves the iBOT patch loss.
    centering: str = choice("center", ("center", "sinkhorn_knopp"))
    sinkhorn_iterations: int = positive(3)  # Sinkhorn-Knopp normalisation rounds (DINOv2: 3)
    # KoLeo regulariser on the student's CLS features of the global crops (DINOv2: 0.1); 0 = off
    koleo_weight: float = non_negative(0.0)
    # "global": nearest neighbours over the whole step's batch, all ranks and micro-batches
    # (the value does not change with the world size); "per_rank": DINOv2's own form, within
    # each rank's micro-batch (for comparison with DINOv2 runs)
    koleo_scope: str = choice("global", ("global", "per_rank"))


@dataclass
class IbotConfig:
    """iBOT's masked-patch loss (DINOv2): some of the student's global-crop patches are
    replaced by a learned mask token and must predict the teacher's patch tokens there."""
    weight: float = non_negative(0.0)  # The masked-patch loss's weight (DINOv2: 1.0); 0 = off
    # The share of global crops that are masked (each crop drawn from its sample's own seed)
    mask_probability: float = unit_interval(0.5)
    # The masked share of a masked crop's patches: drawn from [low, high] (block-wise masks)
    mask_ratio: list[float] = low_high([0.1, 0.5], ceiling=1)
    # A patch head of its own (DINOv2's ViT-L/g) instead of the DINO head shared with CLS
    separate_head: bool = False
    out_dim: int = non_negative(0)  # Prototypes of a separate patch head; 0 = model.out_dim


@dataclass
class EarlyStoppingConfig:
    """Stop when the periodic evaluation's metric has not improved for `patience` evaluations."""
    enabled: bool = False  # needs eval.every_epochs > 0 and a measured metric
    # The metric watched, one the periodic evaluation measures (see eval.every_epochs)
    metric: str = choice("knn_top1", EVAL_METRICS)
    # auto (max for k-NN, min for losses) | max | min
    mode: str = choice("auto", ("auto", "max", "min"))
    patience: int = positive(3)  # evaluations without an improvement of more than min_delta
    min_delta: float = non_negative(0.0)  # a smaller change is no improvement


@dataclass
class TrainConfig:
    epochs: int = positive(100)  # passes over the training data
    max_steps: int = non_negative(0)  # stop after this many optimizer steps; 0 = no limit
    seed: int = non_negative(0)  # initial weights, crops and data order
    # The compute precision of the forward and backward passes
    precision: str = choice("fp32", ("fp32", "bf16", "fp16"))
    # ddp: a whole model per rank; fsdp: parameters, gradients and optimizer state sharded
    parallel: str = choice("ddp", ("ddp", "fsdp"))
    device: str = choice("auto", ("auto", "cpu", "cuda"))  # auto = cuda when present, else cpu
    # The run directory (config, metrics, logs, checkpoints); a restart resumes from it
    output_dir: str = "runs/dino"
    # A collective that waits longer than this fails (a rank died or hangs) instead of hanging
    # forever. Start-up (data scan, demo generation) gets at least 30 min. It must exceed the
    # time rank 0 needs to write one checkpoint, since the other ranks wait for it.
    dist_timeout_s: int = positive(600)
    # Skipped non-finite steps in a row before the run stops
    max_nonfinite_steps: int = non_negative(10)
    compile: bool = False  # torch.compile each transformer block (or ResNet stage)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class CheckpointConfig:
    # Save every N optimizer steps; 0 = only at epoch ends and at the end of the run
    every_steps: int = non_negative(0)
    # Newest checkpoints kept; older ones go once a new one is committed
    keep_last: int = positive(3)
    # Also keep the epoch-end checkpoint of every N-th epoch
    keep_every_epochs: int = non_negative(0)
    resume: bool = True  # resume from the newest valid checkpoint in train.output_dir
    resume_from: str = ""  # a checkpoint file to start from instead of the newest one there
    # Sharded (FSDP) checkpoints only: training waits for the copy to host memory, not for
    # the write; the next save waits for the previous one to be committed.
    async_save: bool = False


@dataclass
class LogConfig:
    every_steps: int = positive(10)  # optimizer steps between metric lines
    tensorboard: bool = True  # event files in RUN/tb
    # A collapse warning needs this many logging steps in a row that look collapsed.
    collapse_window: int = positive(3)
    # Weights & Biases (pip install -e ".[wandb]"): the same scalars, the config and the
    # attention grids, from rank 0; offline without an API key or network.
    wandb: bool = False
    wandb_project: str = "dino_dist"  # the W&B project
    wandb_name: str = ""  # the W&B run name; "" = the run directory's name


@dataclass
class EvalConfig:
    knn_at_end: bool = False  # a k-NN report on the trained teacher (the demo turns it on)
    # Labelled images for k-NN (ImageFolder roots or labelled shard sets): train_path the bank,
    # val_path the queries; "" with data.path=demo = the demo's splits
    train_path: str = ""
    val_path: str = ""  # see train_path
    knn_k: int = positive(20)  # neighbours that vote
    knn_temperature: float = positive(0.07)  # temperature of the k-NN vote weights
    image_size: int = positive(224)  # side of an evaluation image in pixels
    batch_size: int = positive(64)  # evaluation images per batch on each rank
    every_epochs: int = non_negative(0)  # evaluate during training every N epochs; 0 = off
    # Held-out images (any folder layout) for a validation DINO loss; "" = the demo's val
    # split with data.path=demo, else no validation loss.
    val_loss_path: str = ""
    # The metric whose best checkpoint is kept in checkpoints/best/; auto = the first one
    # measured (knn_top1, else val_loss)
    best_metric: str = choice("auto", ("auto",) + EVAL_METRICS)
    # A folder of a few fixed images: a grid of the teacher's last-block CLS attention maps
    # goes to TensorBoard (images) at each periodic evaluation and at the end of the run.
    attention_images: str = ""


def _check_ibot(cfg: Config) -> None:
    if cfg.ibot.out_dim and not cfg.ibot.separate_head:
        raise ConfigError(f"ibot.out_dim={cfg.ibot.out_dim} sizes a separate patch head, but "
                          f"ibot.separate_head=false shares the DINO head (model.out_dim): set "
                          f"ibot.separate_head=true, or ibot.out_dim=0")
    # Masked patches are ViT tokens.
    if cfg.ibot.weight == 0:
        return
    if not cfg.model.arch.startswith("vit"):
        raise ConfigError(f"ibot.weight={cfg.ibot.weight} needs a ViT arch (patch tokens), not "
                          f"model.arch={cfg.model.arch}: set ibot.weight=0")


def _check_eval_paths(e: EvalConfig) -> None:
    # k-NN needs both: a labelled bank (train) and labelled queries to score (val).
    if bool(e.train_path) != bool(e.val_path):
        raise ConfigError("eval.train_path and eval.val_path go together (labelled ImageFolder "
                          "trees for k-NN): set both, or neither")


def _measured_metrics(cfg: Config) -> list[str]:
    """What a periodic evaluation measures with these settings: k-NN on labelled folders
    (eval.train_path/val_path, else the demo's splits) and a validation loss on held-out
    images (eval.val_loss_path, else the demo's val split)."""
    demo = cfg.data.path == "demo"
    knn = ["knn_top1", "knn_top5"] if cfg.eval.train_path or demo else []
    return knn + (["val_loss"] if cfg.eval.val_loss_path or demo else [])


def _check_evaluated_metrics(cfg: Config) -> None:
    # A metric that is never measured would leave early stopping or the best checkpoint
    # waiting for the whole run without a word.
    stop, e = cfg.train.early_stopping, cfg.eval
    if stop.enabled and not e.every_epochs:
        raise ConfigError("train.early_stopping.enabled=true needs periodic evaluation: "
                          "set eval.every_epochs to 1 or more")
    wanted = [("train.early_stopping.metric", stop.metric)] if stop.enabled else []
    if e.every_epochs and e.best_metric != "auto":
        wanted.append(("eval.best_metric", e.best_metric))
    available = _measured_metrics(cfg)
    for key, metric in wanted:
        if metric not in available:
            source = "eval.val_loss_path (held-out images)" if metric == "val_loss" else \
                "eval.train_path and eval.val_path (labelled ImageFolder trees)"
            raise ConfigError(f"{key}={metric} is never measured: set {source}, "
                              f"or choose one of: {', '.join(available) or 'none available'}")


def _check_attention_images(cfg: Config) -> None:
    # The grid shows a ViT's CLS attention and is written to TensorBoard or W&B only.
    if not cfg.eval.attention_images:
        return
    if not cfg.model.arch.startswith("vit"):
        raise ConfigError(f"eval.attention_images is set, but model.arch={cfg.model.arch} "
                          "has no attention: leave eval.attention_images empty")
    if not (cfg.log.tensorboard or cfg.log.wandb):
        raise ConfigError("eval.attention_images draws its grid to TensorBoard (or W&B), "
                          "but log.tensorboard=false: set log.tensorboard=true, or leave "
                          "eval.attention_images empty")


@dataclass
class SlurmConfig:
    """Cluster defaults for launch/submit.py (its options win); training reads max_requeues."""
    partition: str = ""  # "" = the cluster's default partition
    account: str = ""  # "" = none given to sbatch
    qos: str = ""  # "" = none given to sbatch
    constraint: str = ""  # "" = none given to sbatch
    nodes: int = positive(1)  # nodes per job
    gpus_per_node: int = non_negative(0)  # GPUs per node; 0 = none asked for
    # Processes (ranks) per node; 0 = one per GPU, or one per node without GPUs
    tasks_per_node: int = non_negative(0)
    cpus_per_task: int = non_negative(0)  # CPUs per process; 0 = the cluster's default
    mem_gb: int = non_negative(0)  # memory per node in GB; 0 = the cluster's default
    timeout_min: int = positive(1440)  # the time limit of one job, in minutes
    # USR2 this long before the time limit: enough for one step + save
    signal_delay_s: int = non_negative(120)
    # The job requeues itself after a signal at most this many times
    max_requeues: int = non_negative(20)
    job_name: str = "dino"  # the SLURM job name


def _check_signal_delay(slurm: SlurmConfig) -> None:
    if slurm.signal_delay_s >= slurm.timeout_min * 60:
        raise ConfigError(f"slurm.signal_delay_s={slurm.signal_delay_s} (--signal-delay-s) is not "
                          f"shorter than slurm.timeout_min={slurm.timeout_min} minutes "
                          f"(--timeout-min): the job would be signalled before it starts; raise "
                          f"the timeout or lower the delay")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    """Apply every field's own rule, then the rules that tie fields together."""
    _check_fields(cfg, prefix="")
    _check_crops_fit_patches(cfg.model, cfg.data)  # after patch_size is known to be > 0
    _check_packed_crops(cfg.model)
    _check_dinov2_backbone(cfg.model)
    _check_ibot(cfg)
    _check_schedule_epochs(cfg.optim)
    _check_eval_paths(cfg.eval)
    _check_crop_count(cfg.data)
    _check_prefetch(cfg.data)
    _check_evaluated_metrics(cfg)  # after the eval paths are known to be paired
    _check_attention_images(cfg)
    _check_signal_delay(cfg.slurm)


def _check_fields(section: Any, prefix: str) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):  # a section, or a sub-section like train.early_stopping
            _check_fields(value, f"{prefix}{f.name}.")
        elif _RULE in f.metadata:
            _require(f"{prefix}{f.name}", value, *f.metadata[_RULE])


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


@dataclass(frozen=True)
class KeyDoc:
    key: str  # section.key (section.sub.key inside a sub-section)
    default: Any
    rule: str  # the field's requirement, e.g. "must be > 0"; "" when it has none
    comment: str


def key_docs() -> list[KeyDoc]:
    """Every config key with its default, rule and comment, read from the dataclass fields
    and the comments written beside them here, so that a listing (`dino-train --help`)
    cannot disagree with the code."""
    return _section_docs(Config(), prefix="")


def _section_docs(section: Any, prefix: str) -> list[KeyDoc]:
    comments = _field_comments(type(section))
    docs = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            docs.extend(_section_docs(value, f"{prefix}{f.name}."))
        else:
            rule = f.metadata[_RULE][1] if _RULE in f.metadata else ""
            docs.append(KeyDoc(prefix + f.name, value, rule, comments.get(f.name, "")))
    return docs


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the comment lines right above it, then the one on its line(s)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        found[node.target.id] = " ".join(above + own)
    return found
