"""What a rank must keep after a transfer ended: ops still posted, results still fenced.

Owns :class:`OrphanOps`: posted sends or receives whose transfer already ended (cancelled,
timed out, failed). Neither NCCL nor gloo can take back a posted op, so an orphan keeps its
buffer alive until the op completes, and its bytes are dropped; it is never scattered into
cache blocks. A received chunk whose scatter is still running on the device (CUDA) is kept the
same way, behind its fence, so that its staging buffer is not lent out again too early. And :class:`FencedResults`: results held back until the device copies of their
transfer finished, so a driver that frees blocks on a result never frees blocks still being read
or written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from distserve.transfer.backend import PendingOp, TransferBackendError
from distserve.transfer.descriptor import TransferResult
from distserve.transfer.device_stream import PASSED_FENCE, Fence

logger = logging.getLogger(__name__)


def is_settled(op: PendingOp) -> bool:
    """True when ``op`` completed or failed; never blocks."""
    try:
        return op.is_done()
    except TransferBackendError:
        return True


class OrphanOps:
    """Posted ops of ended transfers, kept (with their buffers) until they complete."""

    def __init__(self, release: Callable[[torch.Tensor], None]) -> None:
        self._ops: list[tuple[PendingOp, torch.Tensor, Fence]] = []
        self._release = release  # hands a buffer back once its op settled and its fence passed

    def __len__(self) -> int:
        return len(self._ops)

    def add(self, op: PendingOp, buffer: torch.Tensor, fence: Fence = PASSED_FENCE) -> None:
        self._ops.append((op, buffer, fence))

    def poll(self) -> None:
        still_pending = []
        for op, buffer, fence in self._ops:
            try:
                if not op.is_done() or not fence.is_done():
                    still_pending.append((op, buffer, fence))
                    continue
            except TransferBackendError as err:
                logger.warning("orphaned KV transfer op failed: %s", err)
            self._release(buffer)
        self._ops = still_pending


class FencedResults:
    """Results in finishing order, each released once its fences have passed."""

    def __init__(self) -> None:
        self._entries: list[tuple[TransferResult, list[Fence]]] = []

    def add(self, result: TransferResult, fences: list[Fence]) -> None:
        self._entries.append((result, fences))

    def pop_ready(self) -> list[TransferResult]:
        ready: list[TransferResult] = []
        waiting: list[tuple[TransferResult, list[Fence]]] = []
        for result, fences in self._entries:
            if all(fence.is_done() for fence in fences):
                ready.append(result)
            else:
                waiting.append((result, fences))
        self._entries = waiting
        return ready
