"""The prefill side of KV transfer on one rank: gather blocks, send them in order, report.

Owns :class:`KVSender`. It does not decide what to send (the prefill driver does, on the
decode side's request) nor free blocks (the driver does, after ``poll()`` reports the transfer).

Per transfer, on this rank::

    start_send ──▶ QUEUED ──(every chunk issued)──▶ IN_FLIGHT ──(every isend completed)──▶ DONE
                     │                                  │
                     │ cancel / timeout / send error    │ cancel / timeout / send error
                     ▼                                  ▼
              CANCELLED / FAILED: chunks not yet issued turn VOID and are still sent in
              their turn; issued ones become orphans and finish on their own.

Each (transfer, destination rank) pair is cut into chunks (``chunking.py``), one message each:
an ``index_select`` of the chunk's blocks (restricted to the heads that destination owns) into
the payload of a flat buffer, then one ``isend``. ``start_send`` only plans the chunks, takes
their buffers and issues them in their turn; the gather of each chunk is the send's
``before_post`` hook (``send_fill.py``), which the backend runs right before posting it.

Threads: with gloo, the backend's poster thread for the destination gathers each chunk and
posts it (its socket write is a copy as long as the gather, done while the chunk is still in
cache), while gloo's I/O thread finishes writing the previous one; ``start_send`` returns at
once and the engine thread copies no KV — except for a pair's only chunk, which, finding the
poster idle, is gathered and posted inline as before chunking (``torch_backends.py``). With nccl the gather is queued on the
transfer stream inside ``isend``, ahead of the send. With a CUDA cache on the gloo (host) wire,
``start_send`` queues every gather and its copy to pinned memory on the transfer stream, and a
chunk is issued by the first ``start_send``/``poll`` that finds its gather fence passed.

Ordering. A decode rank posts its receives in (``seq_no``, chunk) order and every backend
matches a pair's messages first-posted-first-matched, so the sender issues chunk c of ``seq_no``
k to a destination only after chunks 0..c-1 of k and every chunk of every seq_no < k to it: a
transfer that is ready early waits in a per-destination queue (``start_send`` of C, A, B issues
A, B, C). Because NCCL has no tags, this is the only thing standing between a message and the
wrong receive buffer; the header's seq_no and chunk index let the receiver catch a violation
instead of scattering the wrong KV.

Every posted receive must be filled, or the pair stalls forever. So a sender never drops a
chunk: a send it cannot honour (the blocks' lease expired: :meth:`KVSender.start_void_send`;
cancelled, failed or timed out before the chunk was gathered) is still sent, as VOID chunks of
the right sizes that the receiver discards and reports as failed.

Results are reported only once no gather reads the source blocks any more (a gather already
running when the transfer ends finishes first; CUDA events with a CUDA cache), and no gather
starts after ``cancel`` or the result, so the driver may free the blocks as soon as it sees one.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch

from distserve.transfer.backend import TransferBackend, TransferBackendError
from distserve.transfer.block_copy import block_index
from distserve.transfer.buffer_pool import DEFAULT_MAX_POOLED_BYTES, MessagePool
from distserve.transfer.checks import check_block_ids, check_cache, check_member
from distserve.transfer.chunking import DEFAULT_CHUNK_BYTES, check_chunk_bytes, plan_chunks
from distserve.transfer.descriptor import TransferDescriptor, TransferResult, TransferState
from distserve.transfer.device_stream import TransferStream
from distserve.transfer.pending import FencedResults, OrphanOps, is_settled
from distserve.transfer.plan import HeadSlice
from distserve.transfer.send_fill import ChunkFiller, gather_chunk
from distserve.transfer.send_queue import (
    FailedOp,
    OutChunk,
    OutMessage,
    OutTransfer,
    SendQueues,
)
from distserve.transfer.wire import HEADER_BYTES, message_bytes


class KVSender:
    """Sends KV blocks from this prefill rank's cache; one per rank, polled every engine step."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        rank: int,
        backend: TransferBackend,
        *,
        timeout_s: float = 60.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_pooled_bytes: int = DEFAULT_MAX_POOLED_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache = kv_cache
        self._rank = rank  # this process's global rank
        self._backend = backend
        self._timeout_s = timeout_s
        self._chunk_bytes = check_chunk_bytes(chunk_bytes)  # must equal the decode side's
        self._clock = clock
        self._wire_device = backend.wire_device(kv_cache.device)
        self._is_pinned = self._wire_device.type == "cpu" and kv_cache.device.type == "cuda"
        self._stream = TransferStream(kv_cache.device)
        self._filler = ChunkFiller(kv_cache, self._stream, rank)
        self._transfers: dict[str, OutTransfer] = {}
        self._queues = SendQueues(self._issue)
        self._finished = FencedResults()  # reported once no gather reads the blocks any more
        self._pool = MessagePool(max_pooled_bytes)
        self._orphans = OrphanOps(self._pool.release)

    # ---- calls from the engine step ------------------------------------------------------

    def start_send(self, desc: TransferDescriptor, src_block_ids: Sequence[int]) -> None:
        """Send ``src_block_ids`` (this rank's cache) to the decode ranks; gathers as it goes."""
        slices = self._my_slices(desc)
        block_ids = check_block_ids(src_block_ids, desc.num_blocks, self._cache)
        transfer = self._new_transfer(desc, slices)
        if not slices:
            return
        transfer.compute_mark = self._stream.compute_mark()  # the forward that wrote the KV
        with self._stream.use(after=transfer.compute_mark):
            transfer.index = block_index(block_ids, self._cache.device)
            for head_slice in slices:
                message = self._enqueue(transfer, head_slice, is_void=False)
                if self._is_pinned:  # host wire, CUDA cache: gather now, on the stream
                    for chunk in message.chunks:
                        gather_chunk(self._cache, desc, message, chunk)
                        chunk.is_gathered, chunk.gather_fence = True, self._stream.fence()
                self._queues.issue_ready(message.dst_rank)

    def start_void_send(self, desc: TransferDescriptor, reason: str) -> None:
        """Answer a request whose KV this rank no longer has: fill the decode side's receives
        with VOID chunks so the pairs stay in step. Reported as CANCELLED with ``reason``."""
        slices = self._my_slices(desc)
        transfer = self._new_transfer(desc, slices)
        for head_slice in slices:
            message = self._enqueue(transfer, head_slice, is_void=True)
            self._queues.issue_ready(message.dst_rank)
        if slices:
            self._finish(transfer, TransferState.CANCELLED, f"void send: {reason}")

    def cancel(self, transfer_id: str) -> bool:
        """Stop a send. Chunks not gathered yet go out VOID in their turn; the rest complete.
        False when the transfer is unknown or already reported."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            return False
        self._finish(transfer, TransferState.CANCELLED, "cancelled by the prefill side")
        return True

    def poll(self) -> list[TransferResult]:
        """Issue what became ready, check what completed; never blocks."""
        self._queues.issue_all_ready()
        now = self._clock()
        for transfer in list(self._transfers.values()):
            self._poll_transfer(transfer, now)
        self._orphans.poll()
        return self._finished.pop_ready()

    # ---- introspection -------------------------------------------------------------------

    def state(self, transfer_id: str) -> TransferState | None:
        transfer = self._transfers.get(transfer_id)
        return transfer.state if transfer is not None else None

    @property
    def num_active(self) -> int:
        return len(self._transfers)

    @property
    def num_orphans(self) -> int:
        return len(self._orphans)

    @property
    def num_buffers_in_use(self) -> int:
        """Message buffers lent out and not yet returned (pending, orphaned or queued)."""
        return self._pool.num_lent

    def check_consistency(self) -> None:
        self._queues.check_consistency(set(self._transfers))
        for transfer in self._transfers.values():
            assert transfer.state in (TransferState.QUEUED, TransferState.IN_FLIGHT)
            assert not transfer.is_closed, transfer.desc.transfer_id
            is_all_issued = all(m.is_all_issued for m in transfer.messages)
            assert is_all_issued == (transfer.state is TransferState.IN_FLIGHT)
            for message in transfer.messages:
                assert tuple(c.span for c in message.chunks) == message.spans

    # ---- internals -----------------------------------------------------------------------

    def _my_slices(self, desc: TransferDescriptor) -> list[HeadSlice]:
        if desc.transfer_id in self._transfers:
            raise ValueError(f"transfer {desc.transfer_id!r} is already being sent")
        tp_rank = check_member(self._rank, desc.src_ranks, "prefill", desc.transfer_id)
        check_cache(self._cache, desc.spec, desc.src_tp)
        slices = [s for s in desc.head_slices() if s.src_tp_rank == tp_rank]
        for head_slice in slices:
            dst_rank = desc.dst_ranks[head_slice.dst_tp_rank]
            self._queues.check_new(dst_rank, desc.seq_no, desc.transfer_id)
        return slices

    def _new_transfer(self, desc: TransferDescriptor, slices: list[HeadSlice]) -> OutTransfer:
        transfer = OutTransfer(desc, self._clock())
        if slices:
            self._transfers[desc.transfer_id] = transfer
        else:  # a replica whose heads other prefill ranks send: nothing to do here
            self._finished.add(TransferResult(desc.transfer_id, TransferState.DONE, 0, 0.0), [])
        return transfer

    def _enqueue(self, transfer: OutTransfer, head_slice: HeadSlice, is_void: bool) -> OutMessage:
        """Plan the pair's chunks, take their buffers and queue the message."""
        desc = transfer.desc
        block_bytes = message_bytes(desc.spec, 1, head_slice.num_heads) - HEADER_BYTES
        spans = plan_chunks(desc.num_blocks, block_bytes, self._chunk_bytes)
        dst_rank = desc.dst_ranks[head_slice.dst_tp_rank]
        message = OutMessage(transfer, dst_rank, head_slice, spans, is_void)
        for span in spans:
            num_bytes = message_bytes(desc.spec, span.num_blocks, head_slice.num_heads)
            buffer = self._pool.acquire(num_bytes, self._wire_device, self._is_pinned)
            message.chunks.append(OutChunk(span, buffer))
        transfer.messages.append(message)
        self._queues.add(message)
        return message

    def _issue(self, message: OutMessage, chunk: OutChunk) -> None:
        """Hand one chunk to the backend, which fills and posts it (``SendQueues``: in turn)."""
        transfer = message.transfer
        fill = functools.partial(self._filler.fill, message, chunk)
        with self._stream.use():  # nccl: the send waits for what the fill queues on the stream
            try:
                is_only_chunk = len(message.spans) == 1  # nothing to overlap: no thread hop
                chunk.op = self._backend.isend(chunk.buffer, message.dst_rank, fill, is_only_chunk)
            except Exception as err:  # a refused post: nothing is in flight for this chunk
                chunk.op = FailedOp(f"isend to rank {message.dst_rank} refused: {err}")
        if self._transfers.get(transfer.desc.transfer_id) is not transfer:
            self._orphans.add(chunk.op, chunk.buffer)  # its transfer already ended
        elif all(m.is_all_issued for m in transfer.messages):
            transfer.state = TransferState.IN_FLIGHT

    def _poll_transfer(self, transfer: OutTransfer, now: float) -> None:
        try:
            is_done = all(c.op is not None and c.op.is_done() for c in transfer.chunks())
        except TransferBackendError as err:
            self._finish(transfer, TransferState.FAILED, str(err))
            return
        if is_done and transfer.state is TransferState.IN_FLIGHT:
            self._finish(transfer, TransferState.DONE, None)
        elif now - transfer.started_s > self._timeout_s:
            unissued = [m.dst_rank for m in transfer.messages if m.num_issued == 0]
            why = (
                f"seq_no {transfer.desc.seq_no} still waits for earlier seq_nos to ranks {unissued}"
                if unissued
                else "the decode ranks never received it"
            )
            self._finish(
                transfer, TransferState.FAILED, f"timed out after {self._timeout_s:.1f} s: {why}"
            )

    def _finish(self, transfer: OutTransfer, state: TransferState, error: str | None) -> None:
        del self._transfers[transfer.desc.transfer_id]
        transfer.state = state
        fill_fence = self._filler.close(transfer)  # chunks not gathered yet will go out VOID
        for message in transfer.messages:
            for chunk in message.chunks[: message.num_issued]:
                assert chunk.op is not None
                if is_settled(chunk.op):
                    self._pool.release(chunk.buffer)
                else:
                    self._orphans.add(chunk.op, chunk.buffer)
        elapsed_s = self._clock() - transfer.started_s
        num_bytes = 0
        if state is TransferState.DONE:
            num_bytes = sum(c.buffer.numel() - HEADER_BYTES for c in transfer.chunks())
        result = TransferResult(transfer.desc.transfer_id, state, num_bytes, elapsed_s, error)
        self._finished.add(result, [fill_fence])
