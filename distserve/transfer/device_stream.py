"""Where the gathers and scatters of KV transfer run, and how the host learns they finished.

Owns :class:`TransferStream` and :class:`Fence`. On CPU everything runs inline and every fence is
already passed. On CUDA the copies run on a side stream, so that they overlap the engine's
compute and the host never blocks on them: a gather first waits (on the device, not the host)
for the compute queued before ``start_send`` — the forward that wrote the KV, marked by
:meth:`TransferStream.compute_mark` on the engine thread, so that a gather queued later or from
another thread still waits for exactly that — and each batch of copies ends in an event that
``poll()`` queries. The CUDA branch is not exercised by the CPU test suite.
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

    def compute_mark(self) -> torch.cuda.Event | None:
        """An event behind the work queued so far on the caller's current stream (CPU: None)."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._stream.device))
        return event

    @contextlib.contextmanager
    def use(self, after: torch.cuda.Event | None = None) -> Iterator[None]:
        """Run the enclosed copies on the transfer stream, after the ``after`` mark if given
        (a sender gathering KV that the last forward wrote)."""
        if self._stream is None:
            yield
            return
        if after is not None:
            self._stream.wait_event(after)
        with torch.cuda.stream(self._stream):
            yield

    def fence(self) -> Fence:
        """A fence behind everything queued on the transfer stream so far."""
        if self._stream is None:
            return PASSED_FENCE
        event = torch.cuda.Event()
        event.record(self._stream)
        return _EventFence(event)
