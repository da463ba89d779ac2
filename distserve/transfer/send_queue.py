"""The sender's records and its per-destination queues that issue chunks strictly in order.

Owns :class:`SendQueues` and the records it orders (:class:`OutTransfer`, :class:`OutMessage`,
:class:`OutChunk`). It does not gather, post or poll: ``sender.py`` hands it messages and gives
it the function that issues one chunk (hands it to the backend, which gathers and posts it).

Per destination rank, messages wait by ``seq_no``; the queue issues the chunks of the message
whose turn it is (``seq_no`` = the destination's next) in chunk order — as far as they are
ready: always on CPU, once their gather fence passed with a CUDA cache on a host wire — and
moves to the next ``seq_no`` only once every chunk of this one is issued::

    destination 5:  next_seq_no = 3
        seq 3: chunks [c0 issued][c1 issued][c2 ready][c3 gathering…]  ← issuing
        seq 4: chunks [c0 ready][c1 ready]                             ← waits for seq 3
        seq 6: …                                                       ← waits for seq 5
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distserve.transfer.backend import PendingOp, TransferBackendError
from distserve.transfer.chunking import ChunkSpan
from distserve.transfer.descriptor import TransferDescriptor, TransferState
from distserve.transfer.device_stream import PASSED_FENCE, Fence
from distserve.transfer.plan import HeadSlice


@dataclass
class OutChunk:
    """One chunk's message on its way out."""

    span: ChunkSpan
    buffer: torch.Tensor  # header + payload, uint8, on the backend's wire device
    is_gathered: bool = False  # gathered by start_send (CUDA cache, host wire); else by the fill
    gather_fence: Fence = PASSED_FENCE  # start_send's gather done: the chunk may be issued
    fill_fence: Fence = PASSED_FENCE  # behind the fill's device copies (CUDA: an event)
    op: PendingOp | None = None  # set when the isend is issued


@dataclass
class OutMessage:
    """One (transfer, destination rank) pair: its chunks, issued strictly in order."""

    transfer: OutTransfer
    dst_rank: int  # global rank of the decode rank
    head_slice: HeadSlice
    spans: tuple[ChunkSpan, ...]  # the pair's chunk plan
    is_void: bool  # a void send: every chunk goes out with a VOID header
    chunks: list[OutChunk] = field(default_factory=list)  # gathered (or void) so far, in order
    num_issued: int = 0  # chunks[:num_issued] have their isend posted

    @property
    def seq_no(self) -> int:
        return self.transfer.desc.seq_no

    @property
    def is_all_issued(self) -> bool:
        return self.num_issued == len(self.spans)


@dataclass
class OutTransfer:
    desc: TransferDescriptor
    started_s: float
    index: torch.Tensor | None = None  # the block ids as a gather index; None for a void send
    compute_mark: torch.cuda.Event | None = None  # gathers wait for it (CUDA: the KV's forward)
    messages: list[OutMessage] = field(default_factory=list)
    state: TransferState = TransferState.QUEUED
    is_closed: bool = False  # under ChunkFiller's lock: no new gather may start
    num_filling: int = 0  # under ChunkFiller's lock: fills running right now

    def chunks(self) -> list[OutChunk]:
        return [chunk for message in self.messages for chunk in message.chunks]


class SendQueues:
    """Messages waiting for their turn, per destination rank."""

    def __init__(self, issue: Callable[[OutMessage, OutChunk], None]) -> None:
        self._issue = issue  # posts one chunk; the queue has already checked it is its turn
        self._next_seq_no: dict[int, int] = {}  # destination rank -> next seq_no to issue
        self._waiting: dict[int, dict[int, OutMessage]] = {}  # destination -> seq_no -> message

    def check_new(self, dst_rank: int, seq_no: int, transfer_id: str) -> None:
        if seq_no < self._next_seq_no.get(dst_rank, 0) or seq_no in self._waiting.get(dst_rank, {}):
            raise ValueError(
                f"seq_no {seq_no} to rank {dst_rank} was already sent or queued "
                f"(transfer {transfer_id!r})"
            )

    def add(self, message: OutMessage) -> None:
        self._waiting.setdefault(message.dst_rank, {})[message.seq_no] = message

    def issue_ready(self, dst_rank: int) -> None:
        """Issue this destination's chunks strictly in (seq_no, chunk) order, as far as ready."""
        waiting = self._waiting[dst_rank]
        next_seq_no = self._next_seq_no.get(dst_rank, 0)
        while (message := waiting.get(next_seq_no)) is not None:
            while (
                message.num_issued < len(message.chunks)
                and message.chunks[message.num_issued].gather_fence.is_done()
            ):
                chunk = message.chunks[message.num_issued]
                message.num_issued += 1
                self._issue(message, chunk)
            if not message.is_all_issued:
                break  # its next chunk is not gathered yet
            del waiting[next_seq_no]
            next_seq_no += 1
            self._next_seq_no[dst_rank] = next_seq_no
        if not waiting:
            del self._waiting[dst_rank]

    def issue_all_ready(self) -> None:
        for dst_rank in list(self._waiting):
            self.issue_ready(dst_rank)

    def check_consistency(self, live_transfer_ids: set[str]) -> None:
        for dst_rank, waiting in self._waiting.items():
            next_seq_no = self._next_seq_no.get(dst_rank, 0)
            assert all(seq_no >= next_seq_no for seq_no in waiting), (dst_rank, next_seq_no)
            for seq_no, message in waiting.items():
                assert message.dst_rank == dst_rank and not message.is_all_issued
                assert seq_no == next_seq_no or message.num_issued == 0, "issued out of turn"
                assert all(c.op is None for c in message.chunks[message.num_issued :])
                is_live = message.transfer.desc.transfer_id in live_transfer_ids
                assert is_live != message.transfer.is_closed, "a message outlived its transfer"


class FailedOp(PendingOp):
    """An isend the backend refused to post: it fails when polled."""

    def __init__(self, error: str) -> None:
        self._error = error

    def is_done(self) -> bool:
        raise TransferBackendError(self._error)
