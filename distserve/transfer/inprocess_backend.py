"""A loopback backend for ranks that live in one process: state-machine tests without a world.

Owns :class:`InProcessFabric` (the "network": per-(src, dst) FIFO queues of posted sends and
receives) and :class:`InProcessBackend` (one rank's endpoint on it). Matching follows the same
rule as NCCL and our gloo backend: the k-th send posted from ``src`` to ``dst`` fills the k-th
receive posted by ``dst`` from ``src``; a size mismatch fails both ops (gloo raises, NCCL would
hang or corrupt). A send's ``before_post`` hook runs inside ``isend``; a receive's
``on_arrival`` hook inside the call that delivers it (the matching ``isend``, ``resume()`` or
``deliver()``), standing in for gloo's waiter thread. A test
can ``pause()`` delivery to hold ops in flight, ``resume()`` it, and ``fail_pair()`` to simulate
a dead peer. While paused, ``deliver()`` lets a given number of a pair's messages through (a
transfer caught between two chunks).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from distserve.transfer.backend import (
    ArrivalHook,
    PendingOp,
    PostHook,
    TransferBackend,
    TransferBackendError,
    register_backend,
    run_hook,
)


class _InProcessOp(PendingOp):
    def __init__(self, message: torch.Tensor, on_arrival: ArrivalHook | None = None) -> None:
        self.message = message
        self.on_arrival = on_arrival
        self.is_complete = False
        self.error: str | None = None

    def is_done(self) -> bool:
        if self.error is not None:
            raise TransferBackendError(self.error)
        return self.is_complete


@dataclass
class _PairQueues:
    sends: deque[_InProcessOp] = field(default_factory=deque)
    recvs: deque[_InProcessOp] = field(default_factory=deque)


class InProcessFabric:
    """Delivers messages between :class:`InProcessBackend` endpoints of one process."""

    def __init__(self) -> None:
        self._pairs: dict[tuple[int, int], _PairQueues] = {}
        self.is_paused = False
        self.sent_log: list[tuple[int, int, int]] = []  # (src, dst, num_bytes) in isend order

    def endpoint(self, rank: int) -> InProcessBackend:
        return InProcessBackend(fabric=self, rank=rank)

    def pause(self) -> None:
        self.is_paused = True

    def resume(self) -> None:
        self.is_paused = False
        for pair in list(self._pairs):
            self._match(pair)

    def deliver(self, src: int, dst: int, num_messages: int) -> None:
        """Match at most ``num_messages`` of the pair's posted sends, even while paused."""
        self._match((src, dst), num_messages)

    def fail_pair(self, src: int, dst: int, reason: str) -> None:
        queues = self._pairs.setdefault((src, dst), _PairQueues())
        for op in (*queues.sends, *queues.recvs):
            op.error = reason
        queues.sends.clear()
        queues.recvs.clear()

    def num_pending(self, src: int, dst: int) -> tuple[int, int]:
        """(posted sends, posted receives) not yet matched on the pair."""
        queues = self._pairs.get((src, dst), _PairQueues())
        return len(queues.sends), len(queues.recvs)

    def post(
        self,
        src: int,
        dst: int,
        message: torch.Tensor,
        is_send: bool,
        on_arrival: ArrivalHook | None = None,
    ) -> PendingOp:
        op = _InProcessOp(message, on_arrival)
        queues = self._pairs.setdefault((src, dst), _PairQueues())
        (queues.sends if is_send else queues.recvs).append(op)
        if is_send:
            self.sent_log.append((src, dst, message.numel()))
        if not self.is_paused:
            self._match((src, dst))
        return op

    def _match(self, pair: tuple[int, int], max_messages: int | None = None) -> None:
        queues = self._pairs.setdefault(pair, _PairQueues())
        num_matched = 0
        while queues.sends and queues.recvs and num_matched != max_messages:
            num_matched += 1
            send, recv = queues.sends.popleft(), queues.recvs.popleft()
            if send.message.numel() != recv.message.numel():
                reason = (
                    f"size mismatch on pair {pair}: sent {send.message.numel()} bytes into a "
                    f"{recv.message.numel()}-byte receive"
                )
                send.error = recv.error = reason
                continue
            recv.message.copy_(send.message)
            send.is_complete = True
            recv.error = run_hook(recv.on_arrival, f"receive on pair {pair}")
            recv.is_complete = recv.error is None


@register_backend
class InProcessBackend(TransferBackend):
    name = "inprocess"

    def __init__(self, fabric: InProcessFabric, rank: int) -> None:
        self._fabric = fabric
        self._rank = rank

    def wire_device(self, cache_device: torch.device) -> torch.device:
        return cache_device

    def isend(
        self,
        message: torch.Tensor,
        peer_rank: int,
        before_post: PostHook | None = None,
        may_post_inline: bool = False,
    ) -> PendingOp:
        error = run_hook(before_post, f"send to rank {peer_rank}")
        if error is not None:  # not posted: the pair's queues never see it
            op = _InProcessOp(message)
            op.error = error
            return op
        return self._fabric.post(self._rank, peer_rank, message, is_send=True)

    def irecv(
        self, message: torch.Tensor, peer_rank: int, on_arrival: ArrivalHook | None = None
    ) -> PendingOp:
        return self._fabric.post(
            peer_rank, self._rank, message, is_send=False, on_arrival=on_arrival
        )
