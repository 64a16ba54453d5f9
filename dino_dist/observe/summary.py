"""`training_summary.json`: how a run ended, in one small file a script or a person can read.

Written by rank 0 when `dino-train` returns (completed, stopped early, stopped by a signal or
failed on non-finite steps), atomically, replacing the previous run's summary of the same
output directory.
"""
from __future__ import annotations

import json
from pathlib import Path

from dino_dist.atomic_file import write_atomically

SUMMARY_NAME = "training_summary.json"


def stop_reason(cfg, end) -> str:
    """completed | max_steps | early stopping: ... | stop request: ... (failures: error: ...)"""
    if end.stop_reason:
        return f"stop request: {end.stop_reason}"
    if end.early_stop:
        return end.early_stop
    if end.position.epoch < cfg.train.epochs:
        return "max_steps"
    return "completed"


def build_summary(cfg, end, start_step: int, wall_time_s: float, loop_time_s: float,
                  world_size: int, best: dict | None, final_metrics: dict) -> dict:
    return {
        "stop_reason": stop_reason(cfg, end),
        "steps": end.position.step,
        "epochs": end.position.epoch,
        "start_step": start_step,
        "world_size": world_size,
        "wall_time_s": round(wall_time_s, 3),
        "images": end.images,
        "images_per_s": end.images / loop_time_s if loop_time_s > 0 else 0.0,
        "best": best,
        "final_metrics": final_metrics,
    }


def failure_summary(reason: str, wall_time_s: float, world_size: int, start_step: int,
                    final_metrics: dict) -> dict:
    """A run that failed (too many non-finite steps): where it was when it was last logged."""
    final = {k: v for k, v in final_metrics.items() if k != "warnings"}
    return {"stop_reason": reason, "steps": final.get("step"), "epochs": final.get("epoch"),
            "start_step": start_step, "world_size": world_size,
            "wall_time_s": round(wall_time_s, 3), "best": None, "final_metrics": final}


def write_summary(output_dir: Path, summary: dict) -> Path:
    text = json.dumps(summary, indent=2, default=float) + "\n"
    return write_atomically(Path(output_dir) / SUMMARY_NAME, lambda f: f.write(text.encode()))
