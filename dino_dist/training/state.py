"""What a checkpoint holds, defined once: each stateful piece of a run and its keys.

Top-level keys, in this order (the format every checkpoint since format 1 has; the
`tests/test_old_checkpoints.py` fixtures freeze it):

    student, teacher, optimizer   the engine's weights (a sharded folder holds them in DCP files)
    scaler, loss                  the engine's GradScaler and the loss center
    step, epoch, epoch_step, epoch_samples, schedule_step    the loop's Position
    world_size                    the run's number of processes when it saved
    skipped_steps, skipped_images the engine's counters
    config                        the resolved config
    rng                           every rank's RNG streams (rank r's at index r)
    evaluation                    the periodic evaluation's best value and patience

Each piece saves and loads itself (`state_dict` / `load_state_dict`); this class only puts
them under their keys, so the checkpoint layer writes one dict and never looks inside.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dino_dist.distributed.collectives import all_gather_objects
from dino_dist.distributed.env import DistEnv
from dino_dist.distributed.rng import rng_state, set_rng_state
from dino_dist.errors import CheckpointError
from dino_dist.training.engine import DinoEngine
from dino_dist.training.loop import Position
from dino_dist.training.weights import WEIGHT_KEYS

REQUIRED_KEYS = ("loss", "step", "epoch", "config")  # plus the weights in a single file


class TrainingState:
    def __init__(self, engine: DinoEngine, evaluation, config: dict[str, Any], env: DistEnv):
        """`evaluation`: anything with state_dict/load_state_dict (eval.periodic's tracker)."""
        self.engine, self.evaluation, self.config, self.env = engine, evaluation, config, env
        self.position = Position()

    def state_dict(self, weights: bool = True) -> dict[str, Any]:
        """The whole state, or all but the weights (a sharded save writes those through DCP).

        Collective: every rank contributes its RNG state, so call it on all ranks.
        """
        engine = self.engine.state_dict(weights)
        counters = {key: engine.pop(key) for key in ("skipped_steps", "skipped_images")}
        return {**engine, **self.position.state_dict(), "world_size": self.env.world_size,
                **counters, "config": self.config, "rng": all_gather_objects(rng_state()),
                "evaluation": self.evaluation.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Everything but a sharded folder's weights (load_sharded_weights). RNG streams only
        on the world size that wrote them: rank r's stream belongs to rank r of that world."""
        self.engine.load_state_dict(state)
        self.evaluation.load_state_dict(state.get("evaluation"))
        self.position = Position.from_state_dict(state)
        if state.get("world_size") == self.env.world_size:
            set_rng_state(state["rng"][self.env.rank])

    def sharded_weights(self) -> dict[str, Any]:
        return self.engine.weights.sharded_state_dict()

    def load_sharded_weights(self, weights: dict[str, Any]) -> None:
        self.engine.weights.load_sharded_state_dict(weights)


def check_contents(path: Path, state: dict[str, Any], sharded: bool) -> None:
    """CheckpointError when a loaded checkpoint lacks what resuming needs."""
    required = REQUIRED_KEYS + (() if sharded else WEIGHT_KEYS)
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks {', '.join(missing)}: "
                              f"it was not written by dino-train")
