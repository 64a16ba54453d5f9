"""Collectives the rest of the code uses, each a no-op in a single process, and what a failed
one means for a user.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def set_collective_timeout(timeout_s: int) -> None:
    """After start-up, let a collective that waits this long fail instead of hanging forever."""
    if not dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    if hasattr(dist, "set_timeout"):
        dist.set_timeout(timeout)
    else:  # torch before the public setter
        from torch.distributed.distributed_c10d import _set_pg_timeout
        _set_pg_timeout(timeout)


# What gloo and NCCL say when a peer died or stopped answering (they raise plain RuntimeError).
_PEER_FAILURE_SIGNS = ("Timed out", "timed out", "Connection reset", "Connection closed",
                       "Broken pipe", "NCCL communicator was aborted", "DistBackendError")


def describe_collective_failure(err: BaseException, timeout_s: int) -> str | None:
    """A one-line explanation when `err` is a collective that lost a peer, else None."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not (isinstance(err, dist.DistError) or any(s in first_line for s in _PEER_FAILURE_SIGNS)):
        return None
    detail = first_line.split("] ", 1)[-1][:200]  # drop gloo's source-file prefix
    return (f"a collective failed ({detail}): another process died or stopped answering "
            f"within train.dist_timeout_s={timeout_s}; restart the job to resume from the "
            f"newest checkpoint")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `tensor` (same shape on all ranks), rank 0's first; no gradient
    flows back. The tensor itself in a single process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)
