"""Weights & Biases for one run (optional): the scalars, images and config MetricsWriter reports.

W&B is a guest: missing, without credentials, unreachable or failing, it costs one log line
and training goes on. Its files go under RUN/wandb/ and its run id is kept in
RUN/wandb_run_id, so a restarted or requeued job continues the same W&B run.
"""
from __future__ import annotations

import logging
import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

from dino_dist.atomic_file import write_atomically

LOG = logging.getLogger("dino_dist")

RUN_ID_FILE = "wandb_run_id"
# Charts use our optimizer step: W&B's own `_step` may only grow, and a resumed run logs
# again the steps between its last checkpoint and the preemption.
STEP_KEY = "step"
INSTALL_HINT = 'pip install -e ".[wandb]"'
# A broken network costs at most this much at start-up, then W&B is off for the run.
INIT_TIMEOUT_S = 30.0
# How long the end of a run may wait for uploads (a job's allocation is still held meanwhile).
FINISH_TIMEOUT_S = 120.0


def has_credentials() -> bool:
    """Whether W&B could log in without asking: an API key in the environment or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def chosen_mode() -> str | None:
    """None lets W&B decide (the user's WANDB_MODE, or online with credentials); else offline,
    because without credentials an online init stops at a login prompt or fails."""
    if os.environ.get("WANDB_MODE") or has_credentials():
        return None
    return "offline"


def run_id_for(output_dir: Path) -> str:
    """The run directory's W&B id: read back after a restart, made once otherwise."""
    path = output_dir / RUN_ID_FILE
    saved = path.read_text().strip() if path.is_file() else ""
    if saved:
        return saved
    run_id = uuid.uuid4().hex[:12]
    write_atomically(path, lambda f: f.write(f"{run_id}\n".encode()))
    return run_id


def to_uint8_hwc(images) -> np.ndarray:
    """[N, H, W, 3] bytes: wandb.Image casts a float array to uint8 without scaling, which
    turns [0, 1] pictures black."""
    scaled = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class WandbSink:
    """One W&B run on rank 0; after its first error every method is a no-op."""

    def __init__(self, run, wandb_module):
        self.run, self.wandb = run, wandb_module

    @classmethod
    def start(cls, output_dir: Path, project: str, name: str, config: dict) -> WandbSink | None:
        try:
            import wandb
        except ImportError:
            LOG.warning("log.wandb=true but wandb is not installed (%s): training goes on "
                        "without W&B", INSTALL_HINT)
            return None
        mode = chosen_mode()
        try:
            run = wandb.init(
                project=project, name=name or output_dir.resolve().name,
                id=run_id_for(output_dir), resume="allow", dir=str(output_dir), config=config,
                mode=mode, settings=wandb.Settings(
                    init_timeout=INIT_TIMEOUT_S, finish_timeout=FINISH_TIMEOUT_S,
                    console="off",  # log.txt already holds the console; no stdout patching
                    allow_val_change=True))  # a requeued run may change a few settings
            run.define_metric(STEP_KEY)
            run.define_metric("*", step_metric=STEP_KEY)
        except Exception as err:  # noqa: BLE001 - any W&B failure only switches W&B off
            LOG.warning("W&B is off for this run (%s); training goes on", one_line(err))
            return None
        if run.offline:
            why = ("no API key (WANDB_API_KEY or `wandb login`)" if mode
                   else "offline by WANDB_MODE or W&B's settings")
            folder = Path(run.dir).parent
            LOG.info("W&B: %s, logging offline to %s; upload it later with `wandb sync %s`",
                     why, folder, folder)
        return cls(run, wandb)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._guarded(lambda: self.run.log({STEP_KEY: step, **scalars}))

    def log_images(self, tag: str, images, step: int) -> None:
        """A float [N, 3, H, W] batch in [0, 1], one W&B image each."""
        self._guarded(lambda: self.run.log(
            {STEP_KEY: step, tag: [self.wandb.Image(pixels) for pixels in to_uint8_hwc(images)]}))

    def close(self) -> None:
        self._guarded(lambda: self.run.finish())
        self.run = None

    def _guarded(self, call) -> None:
        if self.run is None:
            return
        try:
            call()
        except Exception as err:  # noqa: BLE001 - W&B never stops training
            LOG.warning("W&B is off from here on (%s); training goes on", one_line(err))
            self.run = None
