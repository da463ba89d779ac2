"""The prefill side of KV transfer on one rank: gather blocks, send them in order, report.

Owns :class:`KVSender`. It does not decide what to send (the prefill driver does, on the
decode side's request) nor free blocks (the driver does, after ``poll()`` reports the transfer).

Per transfer, on this rank::

    start_send ──▶ QUEUED ──(every message issued)──▶ IN_FLIGHT ──(every isend completed)──▶ DONE
                     │                                    │
                     │ cancel / timeout / send error      │ cancel / timeout / send error
                     ▼                                    ▼
              CANCELLED / FAILED: messages not yet issued turn VOID and are still sent in
              their turn; issued ones become orphans and finish on their own.

One message per (transfer, destination rank): one ``index_select`` of the blocks (restricted to
the heads that destination owns) into the payload of a flat buffer, then one ``isend``.

Ordering. A decode rank posts its receives in ``seq_no`` order and every backend matches a
pair's messages first-posted-first-matched, so the sender issues the ``isend`` of ``seq_no`` k to
a destination only after those of every seq_no < k to it: a message that is ready early waits in
a per-destination queue (``start_send`` of C, A, B issues A, B, C). Because NCCL has no tags,
this is the only thing standing between a message and the wrong receive buffer; the header's
seq_no lets the receiver catch a violation instead of scattering the wrong KV.

Every posted receive must be filled, or the pair stalls forever. So a sender never drops a
seq_no: a send it cannot honour (the blocks' lease expired: :meth:`KVSender.start_void_send`;
cancelled or timed out before its turn) is still sent, as a VOID message of the right size
that the receiver discards and reports as failed.

Results are reported only once the gather has finished reading the source blocks (immediate on
CPU; a CUDA event with a CUDA cache), so the driver may free the blocks as soon as it sees one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from distserve.transfer.backend import PendingOp, TransferBackend, TransferBackendError
from distserve.transfer.block_copy import block_index, gather_blocks
from distserve.transfer.buffer_pool import DEFAULT_MAX_POOLED_BYTES, MessagePool
from distserve.transfer.checks import check_block_ids, check_cache, check_member
from distserve.transfer.descriptor import TransferDescriptor, TransferResult, TransferState
from distserve.transfer.device_stream import PASSED_FENCE, Fence, TransferStream
from distserve.transfer.pending import FencedResults, OrphanOps, is_settled
from distserve.transfer.plan import HeadSlice
from distserve.transfer.wire import (
    HEADER_BYTES,
    MessageHeader,
    MessageKind,
    message_bytes,
    payload_view,
    transfer_tag,
    write_header,
)


@dataclass
class _Message:
    """One (transfer, destination rank) message on its way out."""

    transfer: _Transfer
    dst_rank: int  # global rank of the decode rank
    seq_no: int
    buffer: torch.Tensor  # header + payload, uint8, on the backend's wire device
    gather_fence: Fence  # passed once the payload holds the gathered blocks
    is_void: bool  # send a VOID header: the receiver must discard the payload
    op: PendingOp | None = None  # set when the isend is issued


@dataclass
class _Transfer:
    desc: TransferDescriptor
    started_s: float
    messages: list[_Message] = field(default_factory=list)
    state: TransferState = TransferState.QUEUED


class KVSender:
    """Sends KV blocks from this prefill rank's cache; one per rank, polled every engine step."""

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
        self._next_seq_no: dict[int, int] = {}  # destination rank -> next seq_no to issue
        self._waiting: dict[int, dict[int, _Message]] = {}  # destination -> seq_no -> message
        self._finished = FencedResults()  # reported once the gathers stopped reading the blocks
        self._pool = MessagePool(max_pooled_bytes)
        self._orphans = OrphanOps(self._pool.release)

    # ---- calls from the engine step ------------------------------------------------------

    def start_send(self, desc: TransferDescriptor, src_block_ids: Sequence[int]) -> None:
        """Gather ``src_block_ids`` (this rank's cache) and send them to the decode ranks."""
        slices = self._my_slices(desc)
        block_ids = check_block_ids(src_block_ids, desc.num_blocks, self._cache)
        transfer = self._new_transfer(desc, slices)
        if not slices:
            return
        with self._stream.use(after_compute=True):
            index = block_index(block_ids, self._cache.device)
            for head_slice in slices:
                buffer = self._acquire(desc, head_slice)
                self._gather(desc, index, head_slice, buffer)
                self._enqueue(transfer, head_slice, buffer, self._stream.fence(), is_void=False)

    def start_void_send(self, desc: TransferDescriptor, reason: str) -> None:
        """Answer a request whose KV this rank no longer has: fill the decode side's receives
        with VOID messages so the pairs stay in step. Reported as CANCELLED with ``reason``."""
        slices = self._my_slices(desc)
        transfer = self._new_transfer(desc, slices)
        for head_slice in slices:
            buffer = self._acquire(desc, head_slice)
            self._enqueue(transfer, head_slice, buffer, PASSED_FENCE, is_void=True)
        if slices:
            self._finish(transfer, TransferState.CANCELLED, f"void send: {reason}")

    def cancel(self, transfer_id: str) -> bool:
        """Stop a send. Messages not yet issued go out VOID in their turn; issued ones complete.
        False when the transfer is unknown or already reported."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            return False
        self._finish(transfer, TransferState.CANCELLED, "cancelled by the prefill side")
        return True

    def poll(self) -> list[TransferResult]:
        """Issue what became ready, check what completed; never blocks."""
        for dst_rank in list(self._waiting):
            self._issue_ready(dst_rank)
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
        for dst_rank, waiting in self._waiting.items():
            next_seq_no = self._next_seq_no.get(dst_rank, 0)
            assert all(seq_no >= next_seq_no for seq_no in waiting), (dst_rank, next_seq_no)
            for message in waiting.values():
                assert message.op is None and message.dst_rank == dst_rank
                assert message.is_void or message.transfer.desc.transfer_id in self._transfers
        for transfer in self._transfers.values():
            assert transfer.state in (TransferState.QUEUED, TransferState.IN_FLIGHT)
            is_all_issued = all(m.op is not None for m in transfer.messages)
            assert is_all_issued == (transfer.state is TransferState.IN_FLIGHT)

    # ---- internals -----------------------------------------------------------------------

    def _my_slices(self, desc: TransferDescriptor) -> list[HeadSlice]:
        if desc.transfer_id in self._transfers:
            raise ValueError(f"transfer {desc.transfer_id!r} is already being sent")
        tp_rank = check_member(self._rank, desc.src_ranks, "prefill", desc.transfer_id)
        check_cache(self._cache, desc.spec, desc.src_tp)
        slices = [s for s in desc.head_slices() if s.src_tp_rank == tp_rank]
        for head_slice in slices:
            dst_rank = desc.dst_ranks[head_slice.dst_tp_rank]
            if desc.seq_no < self._next_seq_no.get(dst_rank, 0) or desc.seq_no in self._waiting.get(
                dst_rank, {}
            ):
                raise ValueError(
                    f"seq_no {desc.seq_no} to rank {dst_rank} was already sent or queued "
                    f"(transfer {desc.transfer_id!r})"
                )
        return slices

    def _new_transfer(self, desc: TransferDescriptor, slices: list[HeadSlice]) -> _Transfer:
        transfer = _Transfer(desc, self._clock())
        if slices:
            self._transfers[desc.transfer_id] = transfer
        else:  # a replica whose heads other prefill ranks send: nothing to do here
            self._finished.add(TransferResult(desc.transfer_id, TransferState.DONE, 0, 0.0), [])
        return transfer

    def _acquire(self, desc: TransferDescriptor, head_slice: HeadSlice) -> torch.Tensor:
        num_bytes = message_bytes(desc.spec, desc.num_blocks, head_slice.num_heads)
        return self._pool.acquire(num_bytes, self._wire_device, self._is_pinned)

    def _gather(
        self,
        desc: TransferDescriptor,
        index: torch.Tensor,
        head_slice: HeadSlice,
        buffer: torch.Tensor,
    ) -> None:
        payload = payload_view(buffer, desc.spec, desc.num_blocks, head_slice.num_heads)
        if buffer.device == self._cache.device:
            gather_blocks(self._cache, index, head_slice.src_heads, out=payload)
            return
        staged = torch.empty(payload.shape, dtype=payload.dtype, device=self._cache.device)
        gather_blocks(self._cache, index, head_slice.src_heads, out=staged)
        payload.copy_(staged, non_blocking=True)

    def _enqueue(
        self,
        transfer: _Transfer,
        head_slice: HeadSlice,
        buffer: torch.Tensor,
        fence: Fence,
        is_void: bool,
    ) -> None:
        dst_rank = transfer.desc.dst_ranks[head_slice.dst_tp_rank]
        message = _Message(transfer, dst_rank, transfer.desc.seq_no, buffer, fence, is_void)
        transfer.messages.append(message)
        self._waiting.setdefault(dst_rank, {})[message.seq_no] = message
        self._issue_ready(dst_rank)

    def _issue_ready(self, dst_rank: int) -> None:
        """Issue this destination's messages strictly in seq_no order, as far as they are ready."""
        waiting = self._waiting[dst_rank]
        next_seq_no = self._next_seq_no.get(dst_rank, 0)
        while (message := waiting.get(next_seq_no)) is not None and message.gather_fence.is_done():
            del waiting[next_seq_no]
            next_seq_no += 1
            self._next_seq_no[dst_rank] = next_seq_no
            self._issue(message)
        if not waiting:
            del self._waiting[dst_rank]

    def _issue(self, message: _Message) -> None:
        desc = message.transfer.desc
        kind = MessageKind.VOID if message.is_void else MessageKind.DATA
        header = MessageHeader(
            kind,
            desc.seq_no,
            transfer_tag(desc.transfer_id),
            self._rank,
            message.buffer.numel() - HEADER_BYTES,
        )
        with self._stream.use():
            write_header(message.buffer, header)
            try:
                message.op = self._backend.isend(message.buffer, message.dst_rank)
            except Exception as err:  # a refused post: nothing is in flight for this message
                message.op = _FailedOp(f"isend to rank {message.dst_rank} refused: {err}")
        if (
            desc.transfer_id not in self._transfers
            or self._transfers[desc.transfer_id] is not message.transfer
        ):
            self._orphans.add(message.op, message.buffer)  # its transfer already ended
        elif all(m.op is not None for m in message.transfer.messages):
            message.transfer.state = TransferState.IN_FLIGHT

    def _poll_transfer(self, transfer: _Transfer, now: float) -> None:
        try:
            is_done = all(m.op is not None and m.op.is_done() for m in transfer.messages)
        except TransferBackendError as err:
            self._finish(transfer, TransferState.FAILED, str(err))
            return
        if is_done:
            self._finish(transfer, TransferState.DONE, None)
        elif now - transfer.started_s > self._timeout_s:
            unissued = [m.dst_rank for m in transfer.messages if m.op is None]
            why = (
                f"seq_no {transfer.desc.seq_no} still waits for earlier seq_nos to ranks {unissued}"
                if unissued
                else "the decode ranks never received it"
            )
            self._finish(
                transfer, TransferState.FAILED, f"timed out after {self._timeout_s:.1f} s: {why}"
            )

    def _finish(self, transfer: _Transfer, state: TransferState, error: str | None) -> None:
        del self._transfers[transfer.desc.transfer_id]
        transfer.state = state
        for message in transfer.messages:
            if message.op is None:
                message.is_void = True  # still sent in its turn, so the receiver's slot is filled
            elif is_settled(message.op):
                self._pool.release(message.buffer)
            else:
                self._orphans.add(message.op, message.buffer)
        elapsed_s = self._clock() - transfer.started_s
        num_bytes = 0
        if state is TransferState.DONE:
            num_bytes = sum(m.buffer.numel() - HEADER_BYTES for m in transfer.messages)
        result = TransferResult(transfer.desc.transfer_id, state, num_bytes, elapsed_s, error)
        self._finished.add(result, [m.gather_fence for m in transfer.messages])


class _FailedOp(PendingOp):
    def __init__(self, error: str) -> None:
        self._error = error

    def is_done(self) -> bool:
        raise TransferBackendError(self._error)
