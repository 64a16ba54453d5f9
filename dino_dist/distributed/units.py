"""What a model tells the parallelism code about its own shape.

A model declares its units in a method `parallel_units()` returning `ParallelUnits`: the
submodules that are sharded (FSDP2), compiled and activation-checkpointed one by one.
`distributed/parallel.py` applies its options to exactly these and never looks inside a model
by attribute names, so a renamed or new model cannot silently fall back to one whole-model
wrap: a model without the method is an error. Models sit above this module and import it;
this module knows no model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from torch import nn


@dataclass(frozen=True)
class ParallelUnits:
    # In the order forward runs them: backward starts with the last one.
    shard: Sequence[nn.Module] = ()
    compile: Sequence[nn.Module] = ()
    checkpoint: Sequence[nn.Module] = ()

    def __add__(self, other: ParallelUnits) -> ParallelUnits:
        """The units of a model made of two parts that run one after the other."""
        return ParallelUnits(shard=[*self.shard, *other.shard],
                             compile=[*self.compile, *other.compile],
                             checkpoint=[*self.checkpoint, *other.checkpoint])

    def all(self) -> list[nn.Module]:
        return [*self.shard, *self.compile, *self.checkpoint]


@runtime_checkable
class DeclaresParallelUnits(Protocol):
    """A model whose units are known: every model that parallelism is applied to."""

    def parallel_units(self) -> ParallelUnits: ...


def declared_units(model: nn.Module) -> ParallelUnits:
    """The model's own declaration, checked to name submodules of the model only."""
    if not isinstance(model, DeclaresParallelUnits):
        raise TypeError(
            f"{type(model).__name__} declares no parallel units: give it a parallel_units() "
            f"method returning dino_dist.distributed.units.ParallelUnits (the submodules to "
            f"shard, compile and checkpoint one by one)")
    units = model.parallel_units()
    inside = {id(m) for m in model.modules()}
    strays = sorted({type(u).__name__ for u in units.all() if id(u) not in inside})
    if strays:
        raise TypeError(f"{type(model).__name__}.parallel_units() names modules that are not "
                        f"part of it: {', '.join(strays)}")
    return units
