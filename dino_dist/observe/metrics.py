"""Where a run reports: the console line, log.txt, metrics.jsonl, TensorBoard and W&B.

Only global rank 0 writes; on other ranks every method is a no-op and their logger is set to
errors only, so a job of N processes prints each line once.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from dino_dist.config import Config
from dino_dist.observe.wandb_sink import WandbSink

LOGGER_NAME = "dino_dist"


def setup_logging(output_dir: Path | None, is_main: bool) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if is_main and output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(output_dir / "log.txt")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class MetricsWriter:
    """metrics.jsonl always; TensorBoard if asked; W&B when `config.log.wandb` (which also
    receives the resolved config)."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool = True,
                 config: Config | None = None):
        self.enabled = enabled
        self.jsonl_path = output_dir / "metrics.jsonl"
        self.latest: dict = {}  # the newest value of every column written (for the summary)
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(output_dir / "tb"))
        self.wandb = None
        if enabled and config is not None and config.log.wandb:
            self.wandb = WandbSink.start(output_dir, config.log.wandb_project,
                                         config.log.wandb_name, config.to_dict())

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self.latest.update(record)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        scalars = {f"train/{name}": value for name, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            if values.get("warnings"):
                self.tb.add_text("warnings", ", ".join(values["warnings"]), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log_scalars(step, scalars)

    def add_images(self, tag: str, images, step: int) -> None:
        """A batch of images (float [N, 3, H, W] in [0, 1]) under `tag`, in TensorBoard and W&B."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.add_images(tag, images, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log_images(tag, images, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


class ThroughputMeter:
    """Images/s and the share of wall time spent waiting for data, per logging window."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.window_start = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0

    def add_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def add_images(self, count: int) -> None:
        self.images += count

    def read(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        return self.images / elapsed, self.data_wait / elapsed


def console_line(step: int, total: int, values: dict, eta_s: float) -> str:
    return (f"step {step}/{total} ep {values['epoch']} loss {values['loss']:.4f} "
            f"{_terms_part(values)}lr {values['lr']:.2e} wd {values['wd']:.3f} mom {values['teacher_momentum']:.4f} "
            f"T_t {values['teacher_temp']:.3f} gnorm {values['grad_norm']:.3f} "
            f"{_health_part(values)}"
            f"{values['images_per_s']:.1f} img/s data {100 * values['data_wait_share']:.0f}% "
            f"mem {values['peak_memory_mb']:.0f}MB eta {format_eta(eta_s)}")


def _terms_part(values: dict) -> str:
    """The DINOv2 terms' values, when the recipe has more than the DINO term."""
    terms = [(name, values[f"loss_{name}"]) for name in ("dino", "koleo", "ibot")
             if f"loss_{name}" in values]
    return "".join(f"{name} {value:.3f} " for name, value in terms) if terms else ""


def _health_part(values: dict) -> str:
    """Collapse figures at a glance: entropy as a share of ln(out_dim), KL, prototypes in use."""
    if "entropy_ratio" not in values:
        return ""
    patches = (f"patch H/lnK {values['patch_entropy_ratio']:.2f} proto "
               f"{values['patch_prototypes_used']} " if "patch_entropy_ratio" in values else "")
    return (f"H/lnK {values['entropy_ratio']:.2f} KL {values['kl']:.3f} "
            f"proto {values['prototypes_used']} {patches}")
