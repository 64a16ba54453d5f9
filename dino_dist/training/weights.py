"""The trained weights as a checkpoint holds them: student, teacher and optimizer.

Two layouts: whole tensors under the models' own keys (single-file checkpoints), or DCP's
layout (parameter-name keys, a sharded model's tensors left as shards) for sharded folders,
which load at any world size.
"""
from __future__ import annotations

import torch
from torch import nn

WEIGHT_KEYS = ("student", "teacher", "optimizer")


class TrainedWeights:
    def __init__(self, student: nn.Module, teacher: nn.Module,
                 optimizer: torch.optim.Optimizer):
        self.student, self.teacher, self.optimizer = student, teacher, optimizer

    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])

    def sharded_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             get_optimizer_state_dict)
        return {"student": get_model_state_dict(self.student),
                "teacher": get_model_state_dict(self.teacher),
                "optimizer": get_optimizer_state_dict(self.student, self.optimizer)}

    def load_sharded_state_dict(self, weights: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)
        set_model_state_dict(self.student, weights["student"])
        set_model_state_dict(self.teacher, weights["teacher"])
        # Not strict: a parameter the checkpoint holds no state for (the last layer while
        # it was frozen) stays without one, as in the run that was never stopped.
        set_optimizer_state_dict(self.student, self.optimizer, weights["optimizer"],
                                 options=StateDictOptions(strict=False))
