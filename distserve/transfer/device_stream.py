"""Where the gathers and scatters of KV transfer run, and how the host learns they finished.

Owns :class:`TransferStream` and :class:`Fence`. On CPU everything runs inline and every fence is
already passed. On CUDA the copies run on a side stream, so that they overlap the engine's
compute and the host never blocks on them: a gather first waits (on the device, not the host)
for the compute already queued — the forward that wrote the KV — and each batch of copies ends
in an event that ``poll()`` queries. The CUDA branch is not exercised by the CPU test suite.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator

import torch


class Fence(abc.ABC):
    @abc.abstractmethod
    def is_done(self) -> bool:
        """True once every copy queued before the fence has finished; never blocks."""


class _PassedFence(Fence):
    def is_done(self) -> bool:
        return True


class _EventFence(Fence):
    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def is_done(self) -> bool:
        return bool(self._event.query())


PASSED_FENCE: Fence = _PassedFence()


class TransferStream:
    """Inline on CPU; a dedicated CUDA stream for a CUDA cache."""

    def __init__(self, device: torch.device) -> None:
        self._stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def use(self, after_compute: bool = False) -> Iterator[None]:
        """Run the enclosed copies on the transfer stream.

        ``after_compute`` makes them wait for the work already queued on the caller's current
        stream (a sender gathering KV that the last forward wrote).
        """
        if self._stream is None:
            yield
            return
        if after_compute:
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        with torch.cuda.stream(self._stream):
            yield

    def fence(self) -> Fence:
        """A fence behind everything queued on the transfer stream so far."""
        if self._stream is None:
            return PASSED_FENCE
        event = torch.cuda.Event()
        event.record(self._stream)
        return _EventFence(event)
