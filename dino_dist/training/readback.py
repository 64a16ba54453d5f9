"""Step figures read on the host one step late, so an ordinary step never waits for the device.

Reading a device tensor on the host (`.item()`, `.tolist()`, `bool(t)`) waits for every kernel
queued before it; done each step it stops the host from queuing step N+1 while the device
still runs step N. Here a step's few figures (loss, verdict, stop votes, ...) are copied into
pinned host memory without blocking, behind an event; the next step waits on that event only,
long after the copy is done, while the device works on the step just queued.
"""
from __future__ import annotations

import torch


class HostReadback:
    """One slot: `post` a step's figures, `take` them back (waiting only for their copy)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    @property
    def pending(self) -> bool:
        return self._host is not None

    def post(self, values: torch.Tensor) -> None:
        if self.pending:
            raise RuntimeError("HostReadback.post: the previous figures were never taken")
        values = values.detach()
        if self.device.type != "cuda":
            # Nothing runs ahead of the host on a CPU device: a copy keeps the figures safe
            # from later in-place use of `values`.
            self._host = values.clone()
            return
        self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        self._host.copy_(values, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def take(self) -> list[float] | None:
        """The posted figures as Python floats, or None when nothing is pending."""
        if not self.pending:
            return None
        if self._copied is not None:
            self._copied.synchronize()
        # numpy() of a host tensor is a view: no device involved (the wait was the event).
        figures = self._host.numpy().tolist()
        self._host, self._copied = None, None
        return figures
