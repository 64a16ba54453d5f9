"""This process's random number generators (Python, NumPy, torch, CUDA) as plain data.

Each rank draws its own stochastic-depth and augmentation streams; saving and restoring them
per rank is what makes a resume on the same world size bit-exact, and evaluation borrows and
restores them so that it changes nothing in training.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain lists: weights_only-loadable, and they cross
    all_gather_object on every backend (tensors do not)."""
    name, keys, *rest = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state().tolist(),
             "numpy": (name, keys.tolist(), *rest)}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
