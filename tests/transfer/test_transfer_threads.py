"""Cancel racing a copy that runs on a backend thread: the gather before a send, the scatter
after a receive. In both, ``cancel`` returns at once, the copy already running finishes, no new
copy starts, and the result is held back until the running one is over."""

from __future__ import annotations

import threading
from collections import deque

import pytest
import torch

from distserve.transfer import (
    KVSender,
    PendingOp,
    TransferBackend,
    TransferResult,
    TransferState,
    recv_commit,
    send_fill,
)
from distserve.transfer.backend import ArrivalHook, PostHook
from distserve.transfer.chunking import plan_chunks
from tests.transfer.kv_inprocess_cluster import NUM_DST_BLOCKS, NUM_SRC_BLOCKS, SPEC, Cluster
from tests.transfer.kv_transfer_fixtures import Pull, make_pulls

TWO_BLOCKS = 2 * SPEC.block_bytes()


def _states(results: list[TransferResult]) -> dict[str, TransferState]:
    return {r.transfer_id: r.state for r in results}


def _first_chunk(pull: Pull) -> Pull:
    (span, *_) = plan_chunks(len(pull.src_block_ids), SPEC.block_bytes(), TWO_BLOCKS)
    return Pull("head", pull.src_block_ids[span.blocks], pull.dst_block_ids[span.blocks])


class _Blocking:
    """Wraps a copy function: the first call signals ``started`` and waits for ``release``."""

    def __init__(self, copy):  # type: ignore[no-untyped-def]
        self.copy, self.num_calls = copy, 0
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.num_calls += 1
        if self.num_calls == 1:
            self.started.set()
            assert self.release.wait(10.0)
        self.copy(*args, **kwargs)


class _Posted(PendingOp):
    def __init__(self) -> None:
        self.op: PendingOp | None = None

    def is_done(self) -> bool:
        return self.op is not None and self.op.is_done()


class _PosterBackend(TransferBackend):
    """An in-process endpoint whose sends (and their before_post hooks) run only when
    :meth:`post_all` is called — from a thread of the test's, as gloo's poster thread would."""

    name = "test-poster"

    def __init__(self, inner: TransferBackend) -> None:
        self._inner = inner
        self._sends: deque[tuple[_Posted, torch.Tensor, int, PostHook | None]] = deque()

    def wire_device(self, cache_device: torch.device) -> torch.device:
        return self._inner.wire_device(cache_device)

    def isend(
        self,
        message: torch.Tensor,
        peer_rank: int,
        before_post: PostHook | None = None,
        may_post_inline: bool = False,
    ) -> PendingOp:
        posted = _Posted()
        self._sends.append((posted, message, peer_rank, before_post))
        return posted

    def irecv(
        self, message: torch.Tensor, peer_rank: int, on_arrival: ArrivalHook | None = None
    ) -> PendingOp:
        return self._inner.irecv(message, peer_rank, on_arrival)

    def post_all(self) -> None:
        while self._sends:
            posted, message, peer_rank, before_post = self._sends.popleft()
            posted.op = self._inner.isend(message, peer_rank, before_post)


def test_sender_cancel_while_a_chunk_gathers_waits_for_that_gather_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = Cluster(1, 1, chunk_bytes=TWO_BLOCKS)
    (a,) = make_pulls([6], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=30)
    poster = _PosterBackend(cluster.fabric.endpoint(0))
    sender = KVSender(cluster.senders[0]._cache, 0, poster, chunk_bytes=TWO_BLOCKS)
    cluster.senders[0] = sender
    gather = _Blocking(send_fill.gather_chunk)
    monkeypatch.setattr(send_fill, "gather_chunk", gather)
    cluster.post(a)
    cluster.send(a)  # three chunks handed to the backend, none gathered yet
    assert gather.num_calls == 0 and sender.state("req-0") is TransferState.IN_FLIGHT
    thread = threading.Thread(target=poster.post_all)
    thread.start()
    assert gather.started.wait(10.0)  # chunk 0 is being gathered right now
    assert sender.cancel("req-0")  # returns at once: the engine thread never waits
    assert sender.poll() == []  # CANCELLED only once chunk 0's gather is over
    gather.release.set()
    thread.join(10.0)
    assert gather.num_calls == 1  # chunks 1 and 2 were never gathered: they went out VOID
    assert _states(sender.poll()) == {"req-0": TransferState.CANCELLED}
    (result,) = cluster.receivers[0].poll()
    assert result.state is TransferState.FAILED and "sent no KV" in (result.error or "")
    cluster.assert_landed([_first_chunk(a)])  # chunk 0 was gathered whole before the cancel
    cluster.assert_quiet()


def test_receiver_cancel_while_a_chunk_scatters_waits_for_that_scatter_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = Cluster(1, 1, chunk_bytes=TWO_BLOCKS)
    (a,) = make_pulls([6], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=27)
    scatter = _Blocking(recv_commit.scatter_blocks)
    monkeypatch.setattr(recv_commit, "scatter_blocks", scatter)
    cluster.fabric.pause()
    cluster.post(a)
    cluster.send(a)
    delivery = threading.Thread(target=cluster.fabric.resume)  # plays gloo's waiter thread
    delivery.start()
    assert scatter.started.wait(10.0)  # chunk 0 is being scattered right now
    receiver = cluster.receivers[0]
    assert receiver.cancel("req-0")  # returns at once: the engine thread never waits
    assert receiver.poll() == []  # CANCELLED only once chunk 0's scatter is over
    scatter.release.set()
    delivery.join(10.0)
    assert scatter.num_calls == 1  # chunks 1 and 2 arrived after the cancel: dropped
    assert _states(receiver.poll()) == {"req-0": TransferState.CANCELLED}
    cluster.assert_landed([_first_chunk(a)])
    cluster.senders[0].poll()
    cluster.assert_quiet()
