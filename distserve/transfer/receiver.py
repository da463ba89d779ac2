"""The decode side of KV transfer on one rank: post receives, scatter what arrives, report.

Owns :class:`KVReceiver`. It does not allocate or free blocks (the decode scheduler does) nor
ask the prefill side to send (the instance's control channel does, after ``post_recv``).

Per transfer, on this rank::

    post_recv ──▶ POSTED ──(every chunk arrived and scattered)──▶ COMMITTING ──(device copies done)──▶ DONE
                    │
                    ├─(a VOID or foreign header, recv error)──▶ FAILED
                    ├─ timeout ───────────────────────────────▶ FAILED
                    └─ cancel ────────────────────────────────▶ CANCELLED
           A closed transfer's receives still posted become orphans: they complete into their
           own staging buffers, which are then dropped. The result of a closed transfer is held
           back until a chunk scatter already running has finished (COMMITTING only lasts on
           CUDA, where the scatters are queued on the transfer stream).

Each (transfer, prefill rank) pair arrives as chunks (``chunking.py``), one message each, all
posted at ``post_recv`` in chunk order into their own staging buffers (header + payload). As
each chunk arrives its header is checked — this transfer's id and ``seq_no``, this chunk's index
— and only then is its payload scattered into the chunk's destination blocks with one
``index_copy_`` (``recv_commit.py``). A transfer is DONE once every chunk of every pair was.

What the cache sees: a chunk is written only into its own transfer's blocks, only with the KV
the header says it is, and never after ``cancel``/the result returned (a scatter already running
when the transfer is closed finishes first, and the result waits for it). A transfer that ends
FAILED or CANCELLED may have written some of its blocks, with their correct KV; the driver frees
them on the result, as before.

Threads: with gloo the header check and scatter of a chunk run on the backend's waiter thread
for that prefill rank, right after the chunk's receive completed, while gloo's I/O thread
already fills the next chunk's buffer; ``post_recv``/``cancel``/``poll`` (the engine thread)
never wait for a copy. A pair's *only* chunk is checked and scattered by ``poll()`` instead,
exactly as every message was before chunking: there is nothing to overlap it with, and a small
transfer should not get slower. With nccl both run inside ``poll()``, queued on the transfer
stream; reading a header is then a 64-byte device→host copy on that stream.

Staging buffers come from a pool (``buffer_pool.py``) and go back to it once their receive
completed and their payload was scattered.

Ordering: ``post_recv`` must be called in ``seq_no`` order per prefill instance (checked);
backends match a pair's messages in posting order and the sender issues in (``seq_no``, chunk)
order, so each chunk lands in its own buffer. A cancelled receive cannot be taken back (gloo and
NCCL have no un-post), but it stays first in line and soaks up its own message, so the pair
keeps working. A header with the wrong ``seq_no`` or chunk index means the pair lost step: the
pair is marked broken and every later transfer on it fails at once with that reason.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch

from distserve.transfer.backend import TransferBackend, TransferBackendError, run_hook
from distserve.transfer.block_copy import block_index
from distserve.transfer.buffer_pool import DEFAULT_MAX_POOLED_BYTES, MessagePool
from distserve.transfer.checks import check_block_ids, check_cache, check_member
from distserve.transfer.chunking import DEFAULT_CHUNK_BYTES, check_chunk_bytes, plan_chunks
from distserve.transfer.descriptor import TransferDescriptor, TransferResult, TransferState
from distserve.transfer.device_stream import TransferStream
from distserve.transfer.pending import FencedResults, OrphanOps, is_settled
from distserve.transfer.recv_commit import ChunkCommitter, InChunk, InPart, InTransfer
from distserve.transfer.wire import HEADER_BYTES, message_bytes


class KVReceiver:
    """Receives KV blocks into this decode rank's cache; one per rank, polled every engine step."""

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
        self._chunk_bytes = check_chunk_bytes(chunk_bytes)  # must equal the prefill side's
        self._clock = clock
        self._wire_device = backend.wire_device(kv_cache.device)
        self._is_pinned = self._wire_device.type == "cpu" and kv_cache.device.type == "cuda"
        self._stream = TransferStream(kv_cache.device)
        self._committer = ChunkCommitter(kv_cache, self._stream)
        self._transfers: dict[str, InTransfer] = {}
        self._next_seq_no: dict[int, int] = {}  # source rank -> seq_no the next post must carry
        self._broken: dict[int, str] = {}  # source rank -> why the pair lost step
        self._finished = FencedResults()
        self._pool = MessagePool(max_pooled_bytes)
        self._orphans = OrphanOps(self._pool.release)

    # ---- calls from the engine step ------------------------------------------------------

    def post_recv(self, desc: TransferDescriptor, dst_block_ids: Sequence[int]) -> None:
        """Post the receives of ``desc`` into ``dst_block_ids`` of this rank's cache.

        Call in ``seq_no`` order for each prefill instance, before asking it to send.
        """
        if desc.transfer_id in self._transfers:
            raise ValueError(f"transfer {desc.transfer_id!r} is already posted")
        tp_rank = check_member(self._rank, desc.dst_ranks, "decode", desc.transfer_id)
        check_cache(self._cache, desc.spec, desc.dst_tp)
        block_ids = check_block_ids(dst_block_ids, desc.num_blocks, self._cache)
        slices = [s for s in desc.head_slices() if s.dst_tp_rank == tp_rank]
        for head_slice in slices:
            src_rank = desc.src_ranks[head_slice.src_tp_rank]
            expected = self._next_seq_no.get(src_rank, 0)
            if desc.seq_no != expected:
                raise ValueError(
                    f"receives from rank {src_rank} must be posted in seq_no order: expected "
                    f"{expected}, got {desc.seq_no} (transfer {desc.transfer_id!r})"
                )
        with self._stream.use():  # nccl: nothing here may wait for the engine's compute
            index = block_index(block_ids, self._cache.device)
        transfer = InTransfer(desc, block_ids, index, self._clock())
        broken = [
            f"rank {r}: {self._broken[r]}"
            for r in (desc.src_ranks[s.src_tp_rank] for s in slices)
            if r in self._broken
        ]
        if broken:  # post anyway, to keep the pair's count, but never scatter what lands
            self._committer.close(transfer)
        self._transfers[desc.transfer_id] = transfer
        with self._stream.use():
            for head_slice in slices:
                part = InPart(desc.src_ranks[head_slice.src_tp_rank], head_slice)
                transfer.parts.append(part)
                self._next_seq_no[part.src_rank] = desc.seq_no + 1
                self._post_part(transfer, part)
        if broken:
            self._finish(transfer, TransferState.FAILED, f"pair out of step ({'; '.join(broken)})")

    def cancel(self, transfer_id: str) -> bool:
        """Give up on a transfer; its blocks are never written after this returns, except by a
        chunk scatter already running, which the CANCELLED result waits for. False when the
        transfer is unknown or already reported."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            return False
        self._finish(transfer, TransferState.CANCELLED, "cancelled by the decode side")
        return True

    def poll(self) -> list[TransferResult]:
        """Check what arrived (scatter a pair's only chunk), report what ended; never blocks."""
        now = self._clock()
        for transfer in list(self._transfers.values()):
            if transfer.state is TransferState.POSTED:
                self._poll_posted(transfer, now)
            if transfer.state is TransferState.COMMITTING and all(
                chunk.scatter_fence.is_done() for chunk in transfer.chunks()
            ):
                self._finish(transfer, TransferState.DONE, None)
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
        for transfer in self._transfers.values():
            assert transfer.state in (TransferState.POSTED, TransferState.COMMITTING)
            assert transfer.parts and not transfer.is_closed, transfer.desc.transfer_id
            for part in transfer.parts:
                assert self._next_seq_no[part.src_rank] > transfer.desc.seq_no
                assert [c.span.index for c in part.chunks] == list(range(len(part.chunks)))
                assert part.chunks and part.chunks[-1].span.num_chunks == len(part.chunks)
            if transfer.state is TransferState.COMMITTING:
                assert all(c.has_arrived and c.refusal is None for c in transfer.chunks())

    # ---- internals -----------------------------------------------------------------------

    def _post_part(self, transfer: InTransfer, part: InPart) -> None:
        """Post the pair's chunk receives, in chunk order."""
        spec, num_heads = transfer.desc.spec, part.head_slice.num_heads
        block_bytes = message_bytes(spec, 1, num_heads) - HEADER_BYTES
        spans = plan_chunks(transfer.desc.num_blocks, block_bytes, self._chunk_bytes)
        for span in spans:
            num_bytes = message_bytes(spec, span.num_blocks, num_heads)
            chunk = InChunk(span, self._pool.acquire(num_bytes, self._wire_device, self._is_pinned))
            chunk.is_committed_by_poll = len(spans) == 1  # nothing to overlap: as before chunking
            part.chunks.append(chunk)
            commit = functools.partial(self._committer.on_arrival, transfer, part, chunk)
            on_arrival = None if chunk.is_committed_by_poll else commit
            chunk.op = self._backend.irecv(chunk.buffer, part.src_rank, on_arrival)

    def _poll_posted(self, transfer: InTransfer, now: float) -> None:
        for part in transfer.parts:
            for chunk in part.chunks:
                try:
                    assert chunk.op is not None
                    if not chunk.has_arrived and chunk.op.is_done():
                        chunk.has_arrived = True
                        if chunk.is_committed_by_poll:  # a pair's only chunk: scatter it here
                            commit = functools.partial(
                                self._committer.on_arrival, transfer, part, chunk
                            )
                            error = run_hook(commit, f"message from rank {part.src_rank}")
                            if error is not None:
                                raise TransferBackendError(error)
                except TransferBackendError as err:
                    self._finish(transfer, TransferState.FAILED, str(err))
                    return
                if not chunk.has_arrived:
                    break  # later chunks of this pair arrive after this one
                if chunk.refusal is not None:  # written by the arrival hook, before is_done
                    if chunk.refusal.breaks_pair is not None:
                        self._broken[part.src_rank] = chunk.refusal.breaks_pair
                    self._finish(transfer, TransferState.FAILED, chunk.refusal.error)
                    return
        if all(chunk.has_arrived for chunk in transfer.chunks()):
            transfer.state = TransferState.COMMITTING
        elif now - transfer.started_s > self._timeout_s:
            missing = [p.src_rank for p in transfer.parts if not p.chunks[-1].has_arrived]
            self._finish(
                transfer,
                TransferState.FAILED,
                f"timed out after {self._timeout_s:.1f} s waiting for prefill ranks {missing}",
            )

    def _finish(self, transfer: InTransfer, state: TransferState, error: str | None) -> None:
        del self._transfers[transfer.desc.transfer_id]
        transfer.state = state
        scatter_fence = self._committer.close(transfer)
        for chunk in transfer.chunks():
            assert chunk.op is not None
            if is_settled(chunk.op) and chunk.scatter_fence.is_done():
                self._pool.release(chunk.buffer)
            else:  # still arriving, or its scatter still reads it: dropped once settled
                self._orphans.add(chunk.op, chunk.buffer, chunk.scatter_fence)
        num_bytes = 0
        if state is TransferState.DONE:
            num_bytes = sum(c.buffer.numel() - HEADER_BYTES for c in transfer.chunks())
        elapsed_s = self._clock() - transfer.started_s
        result = TransferResult(transfer.desc.transfer_id, state, num_bytes, elapsed_s, error)
        self._finished.add(result, [scatter_fence])
