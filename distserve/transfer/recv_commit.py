"""The receiver's records, and what happens when one chunk arrives: check it, scatter it.

Owns :class:`InTransfer` / :class:`InPart` / :class:`InChunk` and :class:`ChunkCommitter`, the
one piece of the receiver that runs off the engine thread. ``receiver.py`` owns everything else
(posting, polling, results) and only ever runs on the engine thread.

The backend calls :meth:`ChunkCommitter.on_arrival` once a chunk's bytes are in, before its op
reports done (``backend.py``): with gloo on the per-peer waiter thread, so a chunk is scattered
while the next is still on the wire and however rarely the engine polls; with nccl and the
in-process backend on the thread that polls or delivers. (A pair's only chunk is committed by
the receiver's ``poll()`` instead, through the same method.) It checks the header and scatters the
payload into the transfer's blocks, unless the transfer has been closed (cancelled, failed,
timed out). Closing and starting a scatter are serialized by one lock, held only for those
checks, never during a copy::

    arrival (waiter thread)                       close (engine thread: cancel/_finish)
    lock: closed? → drop, done                    lock: closed = True
          header bad? → record refusal, done      (a scatter already started finishes; the
          num_scattering += 1                      result waits for it via scatter_fence())
    unlock; scatter chunk (no lock)
    lock: num_scattering -= 1

So after ``close`` returns no new write into the cache starts, and a result is released only
once ``num_scattering`` is back to 0 and the device copies are done. The engine thread reads a
chunk's ``refusal``/``scatter_fence`` only after its op reported done, which the backend makes
happen after the hook returned.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from distserve.transfer.backend import PendingOp
from distserve.transfer.block_copy import scatter_blocks
from distserve.transfer.chunking import ChunkSpan
from distserve.transfer.descriptor import TransferDescriptor, TransferState
from distserve.transfer.device_stream import PASSED_FENCE, Fence, TransferStream
from distserve.transfer.plan import HeadSlice
from distserve.transfer.wire import (
    HEADER_BYTES,
    MessageFormatError,
    MessageKind,
    payload_view,
    read_header,
    transfer_tag,
)


@dataclass(frozen=True)
class Refusal:
    """Why an arrived chunk was not scattered."""

    error: str  # the transfer's error
    breaks_pair: str | None = None  # set when the pair lost step: the reason later posts fail with


@dataclass
class InChunk:
    """One chunk this rank expects from one prefill rank."""

    span: ChunkSpan
    buffer: torch.Tensor  # staging: header + payload, on the backend's wire device
    op: PendingOp | None = None  # the posted irecv (set right after posting)
    has_arrived: bool = False  # op reported done: the arrival hook has run
    is_committed_by_poll: bool = False  # a pair's only chunk: poll() commits it, not a hook
    refusal: Refusal | None = None  # set by the arrival hook when it refused the chunk
    scatter_fence: Fence = PASSED_FENCE  # behind the chunk's scatter (CUDA: an event)


@dataclass
class InPart:
    """What this rank receives for a transfer from one prefill rank: its chunks, in order."""

    src_rank: int  # global rank of the prefill rank sending it
    head_slice: HeadSlice
    chunks: list[InChunk] = field(default_factory=list)


@dataclass
class InTransfer:
    desc: TransferDescriptor
    block_ids: list[int]
    index: torch.Tensor  # block_ids as the scatter's index tensor, on the cache device
    started_s: float
    parts: list[InPart] = field(default_factory=list)
    state: TransferState = TransferState.POSTED
    is_closed: bool = False  # under ChunkCommitter's lock: no new scatter may start
    num_scattering: int = 0  # under ChunkCommitter's lock: scatters running right now

    def chunks(self) -> list[InChunk]:
        return [chunk for part in self.parts for chunk in part.chunks]


class _ScatterFence(Fence):
    """Passed once no scatter of a closed transfer runs and its device copies are done."""

    def __init__(self, transfer: InTransfer) -> None:
        self._transfer = transfer

    def is_done(self) -> bool:
        # A closed transfer's count only goes down; reading an int needs no lock.
        return self._transfer.num_scattering == 0 and all(
            chunk.scatter_fence.is_done() for chunk in self._transfer.chunks()
        )


class ChunkCommitter:
    """Checks and scatters arrived chunks into the cache; the only cross-thread code."""

    def __init__(self, cache: torch.Tensor, stream: TransferStream) -> None:
        self._cache = cache
        self._stream = stream
        self._lock = threading.Lock()

    def close(self, transfer: InTransfer) -> Fence:
        """No scatter of ``transfer`` starts after this; the fence passes when all have ended."""
        with self._lock:
            transfer.is_closed = True
        return _ScatterFence(transfer)

    def on_arrival(self, transfer: InTransfer, part: InPart, chunk: InChunk) -> None:
        with self._lock:
            if transfer.is_closed:
                return  # its bytes are dropped with the buffer
            chunk.refusal = _check_header(transfer.desc, part, chunk)
            if chunk.refusal is not None:
                return
            transfer.num_scattering += 1
        try:
            spec, heads = transfer.desc.spec, part.head_slice
            with self._stream.use():
                payload = payload_view(chunk.buffer, spec, chunk.span.num_blocks, heads.num_heads)
                if payload.device != self._cache.device:
                    payload = payload.to(self._cache.device, non_blocking=True)
                scatter_blocks(
                    self._cache, transfer.index[chunk.span.blocks], heads.dst_heads, payload
                )
                chunk.scatter_fence = self._stream.fence()
        finally:
            with self._lock:
                transfer.num_scattering -= 1


def _check_header(desc: TransferDescriptor, part: InPart, chunk: InChunk) -> Refusal | None:
    """Why this chunk must not be scattered, or None when it is this transfer's next KV."""
    src, span = part.src_rank, chunk.span
    try:
        header = read_header(chunk.buffer)
    except MessageFormatError as err:
        return Refusal(f"garbled message from rank {src}: {err}", breaks_pair=str(err))
    if header.seq_no != desc.seq_no or header.tag != transfer_tag(desc.transfer_id):
        why = f"got seq_no {header.seq_no} where {desc.seq_no} (transfer {desc.transfer_id!r}) was posted"
        return Refusal(f"message from rank {src} out of order: {why}", breaks_pair=why)
    if (header.chunk_index, header.num_chunks) != (span.index, span.num_chunks):
        why = (
            f"got chunk {header.chunk_index}/{header.num_chunks} of seq_no {desc.seq_no} where "
            f"chunk {span.index}/{span.num_chunks} was posted (do both sides use the same "
            "chunk_bytes?)"
        )
        return Refusal(f"message from rank {src} out of order: {why}", breaks_pair=why)
    if header.payload_bytes != chunk.buffer.numel() - HEADER_BYTES or header.src_rank != src:
        return Refusal(f"message from rank {src} has a mismatched header {header}")
    if header.kind is MessageKind.VOID:
        return Refusal(
            f"prefill rank {src} sent no KV (lease expired, cancelled or timed out there)"
        )
    return None
