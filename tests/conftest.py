"""Shared test helpers: tiny real image folders on disk and real training subprocesses."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def write_image_folder(root: Path, classes: int = 2, per_class: int = 16, size: int = 24,
                       seed: int = 0, labelled: bool = True) -> Path:
    """Real PNG files with a little structure: class c has a bright band at row c."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}" if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, size=(size, size, 3), dtype=np.uint8)
            band = (c * size // max(classes, 1)) % size
            pixels[band: band + size // 4] += 120
            Image.fromarray(pixels).save(folder / f"img_{c}_{i:03d}.png")
    return root


# The seed of the runs that compare 1 rank x B with 2 ranks x B/2 or k x B/k. Seed 0's first
# batch puts one bias element in AdamW's eps regime, where float32 rounding of the batch sum
# becomes a 2.6e-5 weight difference (figures: docs/architecture.md, "How the math is kept
# exact"); test_equivalence checks seed 0 on the gradients, before AdamW.
EQUIVALENCE_SEED = 1


def tiny_overrides(data_path: Path, output_dir: Path, **extra) -> list[str]:
    """A config small enough for a few CPU steps in a couple of seconds."""
    values = {
        "data.path": str(data_path), "data.num_workers": 0, "data.global_crop_size": 16,
        "data.local_crops_number": 2, "data.local_crop_size": 8, "model.arch": "vit_mini",
        "model.patch_size": 8, "model.drop_path_rate": 0.0, "model.out_dim": 256,
        "model.head_hidden_dim": 64, "model.head_bottleneck_dim": 32,
        "optim.batch_size_per_gpu": 8, "optim.warmup_epochs": 0, "optim.lr": 0.002,
        "optim.freeze_last_layer": 0, "train.epochs": 2, "train.output_dir": str(output_dir),
        "train.device": "cpu", "log.every_steps": 1, "log.tensorboard": False,
        "eval.knn_at_end": False, "optim.teacher_momentum": 0.996,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # several processes share 2 cores
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def child_pids(parent_pid: int) -> list[int]:
    """Direct children of a process (torchrun's workers), read from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent_pid:
                children.append(int(entry.name))
    return sorted(children)


def kill_pids(pids) -> None:
    """SIGKILL each pid; one that already exited is fine."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(overrides: list[str], nproc: int = 1, config: str | None = None,
              timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    """dino-train in a real subprocess; under torchrun with gloo when nproc > 1."""
    args = (["--config", config] if config else []) + overrides
    if nproc == 1:
        cmd = [sys.executable, "-m", "dino_dist.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "dino_dist.train", *args]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def without_key_bias(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Drop the attention key bias from a comparison.

    Adding a constant to every key shifts all of a query's logits equally, so softmax makes
    the key bias's gradient exactly zero in exact arithmetic. What the backward produces is
    rounding noise (~1e-10), which AdamW normalises into lr-sized steps of random sign:
    that slice is noise by construction in *any* two runs, not a sign of wrong math.
    """
    if not key.endswith("attn.qkv.bias"):
        return tensor
    third = tensor.numel() // 3
    return torch.cat((tensor[:third], tensor[2 * third:]))


def max_relative_error(a: dict, b: dict) -> tuple[float, str]:
    worst, worst_key = 0.0, ""
    for key in b:
        x = without_key_bias(key, a[key].double())
        y = without_key_bias(key, b[key].double())
        err = ((x - y).norm() / y.norm().clamp_min(1e-12)).item()
        if err > worst:
            worst, worst_key = err, key
    return worst, worst_key


def state_at(run_dir: Path, step: int) -> dict:
    """The checkpoint of `step` in a run directory, as whole tensors (DDP file or FSDP folder)."""
    from dino_dist.checkpoint.sharded import read_full
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    if folder.is_dir():
        return read_full(folder)
    return torch.load(folder.with_name(folder.name + ".pt"), weights_only=True)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


def _default_logger() -> None:
    logger = logging.getLogger("dino_dist")
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture(autouse=True)
def _fresh_logger():
    """Commands run in-process set the `dino_dist` logger up for a run (its own handlers, no
    propagation); every test starts and ends with the default, so caplog sees the records
    whatever ran before it in the same worker."""
    _default_logger()
    yield
    _default_logger()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Demo data goes to a per-session folder, never the user's cache."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("DINO_DIST_CACHE", str(cache))
    yield




LONGEST_FIRST = ("test_demo.py",)  # the full default demo: ~6-7 minutes of one worker


def pytest_collection_modifyitems(items) -> None:
    """The longest file first: with --no-loadscope-reorder (setup.cfg) --dist loadfile hands
    files out in collection order, so the demo starts at once on one worker while the other
    takes the rest, instead of starting last with the other worker idle for its length."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)
