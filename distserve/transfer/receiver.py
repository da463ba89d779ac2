"""The decode side of KV transfer on one rank: post receives, scatter what arrives, report.

Owns :class:`KVReceiver`. It does not allocate or free blocks (the decode scheduler does) nor
ask the prefill side to send (the instance's control channel does, after ``post_recv``).

Per transfer, on this rank::

    post_recv ──▶ POSTED ──(every message arrived, headers valid)──▶ COMMITTING ──(scatter done)──▶ DONE
                    │   │                                              │
                    │   └─(VOID or foreign header, recv error)──▶ FAILED
                    │ timeout ─────────────────────────────────▶ FAILED     │ cancel: scatter already
                    │ cancel ──────────────────────────────────▶ CANCELLED  │ queued, so CANCELLED is
                    ▼                                                       ▼ reported once it finished
           the posted irecvs become orphans: they still complete into their own staging
           buffers, which are then dropped. Nothing is ever written into cache blocks after
           a transfer leaves POSTED other than by its own scatter.

One message per (transfer, source rank), each received into its own staging buffer (header +
payload); the payloads are scattered into the destination blocks with one ``index_copy_`` each,
and only once every message of the transfer arrived with a header naming this transfer's
``seq_no`` and id. So a cancelled, timed-out or failed transfer never touches the cache, and the
decode side may free its blocks as soon as ``poll()`` reports the result (never earlier: on CUDA
a COMMITTING scatter is still writing).

Staging buffers come from a pool (``buffer_pool.py``) and go back to it once their receive
completed and their payload was scattered. On the nccl path, reading a header is a 64-byte
device→host copy on the transfer stream (not the compute stream).

Ordering: ``post_recv`` must be called in ``seq_no`` order per prefill instance (checked);
backends match a pair's messages in posting order and the sender issues in ``seq_no`` order, so
each message lands in its own transfer's buffer. A cancelled receive cannot be taken back
(gloo and NCCL have no un-post), but it stays first in line and soaks up its own message, so the
pair keeps working. A header with the wrong ``seq_no`` means the pair lost step: the pair is
marked broken and every later transfer on it fails at once with that reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from distserve.transfer.backend import PendingOp, TransferBackend, TransferBackendError
from distserve.transfer.block_copy import block_index, scatter_blocks
from distserve.transfer.buffer_pool import DEFAULT_MAX_POOLED_BYTES, MessagePool
from distserve.transfer.checks import check_block_ids, check_cache, check_member
from distserve.transfer.descriptor import TransferDescriptor, TransferResult, TransferState
from distserve.transfer.device_stream import PASSED_FENCE, Fence, TransferStream
from distserve.transfer.pending import FencedResults, OrphanOps, is_settled
from distserve.transfer.plan import HeadSlice
from distserve.transfer.wire import (
    HEADER_BYTES,
    MessageFormatError,
    MessageKind,
    message_bytes,
    payload_view,
    read_header,
    transfer_tag,
)


@dataclass
class _Part:
    """One message this rank expects for a transfer: from one prefill rank."""

    src_rank: int  # global rank of the prefill rank sending it
    head_slice: HeadSlice
    buffer: torch.Tensor  # staging: header + payload, on the backend's wire device
    op: PendingOp  # the posted irecv
    has_arrived: bool = False


@dataclass
class _Transfer:
    desc: TransferDescriptor
    block_ids: list[int]
    started_s: float
    parts: list[_Part] = field(default_factory=list)
    state: TransferState = TransferState.POSTED
    scatter_fence: Fence = PASSED_FENCE
    is_cancelled: bool = False  # asked to cancel while COMMITTING


class KVReceiver:
    """Receives KV blocks into this decode rank's cache; one per rank, polled every engine step."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        rank: int,
        backend: TransferBackend,
        *,
        timeout_s: float = 60.0,
        max_pooled_bytes: int = DEFAULT_MAX_POOLED_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache = kv_cache
        self._rank = rank  # this process's global rank
        self._backend = backend
        self._timeout_s = timeout_s
        self._clock = clock
        self._wire_device = backend.wire_device(kv_cache.device)
        self._is_pinned = self._wire_device.type == "cpu" and kv_cache.device.type == "cuda"
        self._stream = TransferStream(kv_cache.device)
        self._transfers: dict[str, _Transfer] = {}
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
        transfer = _Transfer(desc, block_ids, self._clock())
        self._transfers[desc.transfer_id] = transfer
        with self._stream.use():  # nccl: the receive must not wait for the engine's compute
            for head_slice in slices:
                src_rank = desc.src_ranks[head_slice.src_tp_rank]
                self._next_seq_no[src_rank] = desc.seq_no + 1
                num_bytes = message_bytes(desc.spec, desc.num_blocks, head_slice.num_heads)
                buffer = self._pool.acquire(num_bytes, self._wire_device, self._is_pinned)
                op = self._backend.irecv(buffer, src_rank)
                transfer.parts.append(_Part(src_rank, head_slice, buffer, op))
        broken = [
            f"rank {r}: {self._broken[r]}" for r in self._pair_ranks(transfer) if r in self._broken
        ]
        if broken:
            self._finish(transfer, TransferState.FAILED, f"pair out of step ({'; '.join(broken)})")

    def cancel(self, transfer_id: str) -> bool:
        """Give up on a transfer; its blocks are never written after this returns, except by a
        scatter already running (COMMITTING), which the CANCELLED result waits for. False when
        the transfer is unknown or already reported."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            return False
        if transfer.state is TransferState.COMMITTING:
            transfer.is_cancelled = True
        else:
            self._finish(transfer, TransferState.CANCELLED, "cancelled by the decode side")
        return True

    def poll(self) -> list[TransferResult]:
        """Check what arrived, scatter what is complete, report what ended; never blocks."""
        now = self._clock()
        for transfer in list(self._transfers.values()):
            if transfer.state is TransferState.POSTED:
                self._poll_posted(transfer, now)
            if transfer.state is TransferState.COMMITTING and transfer.scatter_fence.is_done():
                if transfer.is_cancelled:
                    self._finish(transfer, TransferState.CANCELLED, "cancelled by the decode side")
                else:
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
            assert transfer.parts, transfer.desc.transfer_id
            for part in transfer.parts:
                assert self._next_seq_no[part.src_rank] > transfer.desc.seq_no
            if transfer.state is TransferState.COMMITTING:
                assert all(part.has_arrived for part in transfer.parts)

    # ---- internals -----------------------------------------------------------------------

    @staticmethod
    def _pair_ranks(transfer: _Transfer) -> list[int]:
        return [part.src_rank for part in transfer.parts]

    def _poll_posted(self, transfer: _Transfer, now: float) -> None:
        try:
            for part in transfer.parts:
                part.has_arrived = part.has_arrived or part.op.is_done()
        except TransferBackendError as err:
            self._finish(transfer, TransferState.FAILED, str(err))
            return
        if all(part.has_arrived for part in transfer.parts):
            self._commit(transfer)
        elif now - transfer.started_s > self._timeout_s:
            missing = [part.src_rank for part in transfer.parts if not part.has_arrived]
            self._finish(
                transfer,
                TransferState.FAILED,
                f"timed out after {self._timeout_s:.1f} s waiting for prefill ranks {missing}",
            )

    def _commit(self, transfer: _Transfer) -> None:
        """Check every header, then scatter every payload into the transfer's blocks."""
        desc = transfer.desc
        with self._stream.use():
            for part in transfer.parts:
                error = self._check_header(desc, part)
                if error is not None:
                    self._finish(transfer, TransferState.FAILED, error)
                    return
            index = block_index(transfer.block_ids, self._cache.device)
            for part in transfer.parts:
                payload = payload_view(
                    part.buffer, desc.spec, desc.num_blocks, part.head_slice.num_heads
                )
                if payload.device != self._cache.device:
                    payload = payload.to(self._cache.device, non_blocking=True)
                scatter_blocks(self._cache, index, part.head_slice.dst_heads, payload)
            transfer.scatter_fence = self._stream.fence()
        transfer.state = TransferState.COMMITTING

    def _check_header(self, desc: TransferDescriptor, part: _Part) -> str | None:
        """Why this message must not be scattered, or None when it is this transfer's KV."""
        try:
            header = read_header(part.buffer)
        except MessageFormatError as err:
            self._broken[part.src_rank] = str(err)
            return f"garbled message from rank {part.src_rank}: {err}"
        if header.seq_no != desc.seq_no or header.tag != transfer_tag(desc.transfer_id):
            why = f"got seq_no {header.seq_no} where {desc.seq_no} (transfer {desc.transfer_id!r}) was posted"
            self._broken[part.src_rank] = why
            return f"message from rank {part.src_rank} out of order: {why}"
        if (
            header.payload_bytes != part.buffer.numel() - HEADER_BYTES
            or header.src_rank != part.src_rank
        ):
            return f"message from rank {part.src_rank} has a mismatched header {header}"
        if header.kind is MessageKind.VOID:
            return f"prefill rank {part.src_rank} sent no KV (lease expired, cancelled or timed out there)"
        return None

    def _finish(self, transfer: _Transfer, state: TransferState, error: str | None) -> None:
        del self._transfers[transfer.desc.transfer_id]
        transfer.state = state
        for part in transfer.parts:
            if is_settled(part.op):  # and its scatter, if any, has finished
                self._pool.release(part.buffer)
            else:
                self._orphans.add(part.op, part.buffer)  # lands in its own buffer, then dropped
        num_bytes = 0
        if state is TransferState.DONE:
            num_bytes = sum(part.buffer.numel() - HEADER_BYTES for part in transfer.parts)
        elapsed_s = self._clock() - transfer.started_s
        result = TransferResult(transfer.desc.transfer_id, state, num_bytes, elapsed_s, error)
        self._finished.add(result, [transfer.scatter_fence])
