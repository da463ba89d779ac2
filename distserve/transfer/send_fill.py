"""What happens right before one chunk is posted: write its header, gather its blocks.

Owns :class:`ChunkFiller`, the one piece of the sender that runs off the engine thread, and
:func:`gather_chunk`. ``sender.py`` owns everything else (queuing, polling, results) and only
ever runs on the engine thread.

The backend calls :meth:`ChunkFiller.fill` right before it posts a chunk's send
(``backend.py``): with gloo on the per-peer poster thread, so the gather of chunk k+1 runs while
chunk k is on the wire and leaves the chunk in cache for its socket write; with nccl and the
in-process backend inline in ``isend``. It writes a DATA header and gathers the chunk's blocks,
or — when the message is VOID or its transfer has been closed (cancelled, failed, timed out) — a
VOID header and no gather, since the source blocks may already be freed. Closing and starting a
gather are serialized by one lock, held only for those checks, never during a copy::

    fill (poster thread)                            close (engine thread: cancel/_finish)
    lock: void or closed? → VOID header, done       lock: closed = True
          num_filling += 1                          (a gather already started finishes; the
    unlock; gather + DATA header (no lock)           result waits for it via close()'s fence)
    lock: num_filling -= 1

So after ``close`` returns no new read of the source blocks starts, and a result is released
only once ``num_filling`` is back to 0 and the device copies are done.

With a CUDA cache and a host wire (gloo), gathers are not done here: ``start_send`` queues them
on the transfer stream and the queue issues a chunk once its gather fence passed, so that no
thread ever waits on the device (``sender.py``); the fill then only writes the header.
"""

from __future__ import annotations

import threading

import torch

from distserve.transfer.block_copy import gather_blocks
from distserve.transfer.descriptor import TransferDescriptor
from distserve.transfer.device_stream import Fence, TransferStream
from distserve.transfer.send_queue import OutChunk, OutMessage, OutTransfer
from distserve.transfer.wire import (
    HEADER_BYTES,
    MessageHeader,
    MessageKind,
    payload_view,
    transfer_tag,
    write_header,
)


def gather_chunk(
    cache: torch.Tensor, desc: TransferDescriptor, message: OutMessage, chunk: OutChunk
) -> None:
    """Gather ``chunk``'s blocks (the message's heads) into its buffer's payload."""
    assert message.transfer.index is not None
    span, heads = chunk.span, message.head_slice
    index = message.transfer.index[span.blocks]
    payload = payload_view(chunk.buffer, desc.spec, span.num_blocks, heads.num_heads)
    if chunk.buffer.device == cache.device:
        gather_blocks(cache, index, heads.src_heads, out=payload)
        return
    staged = torch.empty(payload.shape, dtype=payload.dtype, device=cache.device)
    gather_blocks(cache, index, heads.src_heads, out=staged)
    payload.copy_(staged, non_blocking=True)


class _FillFence(Fence):
    """Passed once no fill of a closed transfer runs and its device copies are done."""

    def __init__(self, transfer: OutTransfer) -> None:
        self._transfer = transfer

    def is_done(self) -> bool:
        # A closed transfer's count only goes down; reading an int needs no lock.
        return self._transfer.num_filling == 0 and all(
            chunk.fill_fence.is_done() and chunk.gather_fence.is_done()
            for chunk in self._transfer.chunks()
        )


class ChunkFiller:
    """Writes headers and gathers chunks right before they are posted; cross-thread code."""

    def __init__(self, cache: torch.Tensor, stream: TransferStream, rank: int) -> None:
        self._cache = cache
        self._stream = stream
        self._rank = rank  # this process's global rank, written into every header
        self._lock = threading.Lock()

    def close(self, transfer: OutTransfer) -> Fence:
        """No gather of ``transfer`` starts after this; the fence passes when all have ended."""
        with self._lock:
            transfer.is_closed = True
        return _FillFence(transfer)

    def fill(self, message: OutMessage, chunk: OutChunk) -> None:
        transfer = message.transfer
        with self._lock:
            is_data = not (transfer.is_closed or message.is_void)
            if is_data:
                transfer.num_filling += 1
        try:
            desc = transfer.desc
            with self._stream.use(after=transfer.compute_mark):
                if is_data and not chunk.is_gathered:
                    gather_chunk(self._cache, desc, message, chunk)
                header = MessageHeader(
                    MessageKind.DATA if is_data else MessageKind.VOID,
                    desc.seq_no,
                    transfer_tag(desc.transfer_id),
                    self._rank,
                    chunk.buffer.numel() - HEADER_BYTES,
                    chunk.span.index,
                    chunk.span.num_chunks,
                )
                write_header(chunk.buffer, header)
                chunk.fill_fence = self._stream.fence()
        finally:
            if is_data:
                with self._lock:
                    transfer.num_filling -= 1
