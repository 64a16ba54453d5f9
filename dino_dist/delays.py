"""Pauses that only tests switch on, each by its own environment variable.

Fault tests stretch a checkpoint write so a kill can land inside it
(DINO_DIST_TEST_SAVE_DELAY_S); time-limit tests stretch each step so a run holds wall time
without CPU (DINO_DIST_TEST_STEP_DELAY_S). Unset, as in every normal run, they cost nothing.
"""
from __future__ import annotations

import os
import time


def pause_seconds(variable: str) -> float:
    return float(os.environ.get(variable, "0") or 0)


def pause_if_set(variable: str) -> None:
    seconds = pause_seconds(variable)
    if seconds > 0:
        time.sleep(seconds)
