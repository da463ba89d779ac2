"""The torch.distributed backends: ``gloo`` (host buffers) and ``nccl`` (device buffers).

Owns only the thin mapping from :class:`TransferBackend` to ``dist.isend``/``dist.irecv`` on a
process group that spans both instances (the default world group unless one is given), and
which thread does what around them (the gloo threads themselves live in ``gloo_threads.py``).
Which group exists, and its init, belong to the launcher.

- ``gloo`` moves host buffers. With a CUDA cache the sender gathers on the device and copies into
  a pinned host message, and the receiver copies back before scattering (see ``sender.py``).
  Gloo's point-to-point ``Work`` cannot be polled: ``is_completed()`` stays False until someone
  calls ``wait()``, and it has no future. So each (peer, direction) gets one daemon *waiter*
  thread that ``wait()``s that peer's ops in posting order (the order they complete in: one TCP
  connection, first-posted-first-matched) and flags them done; ``wait()`` releases the GIL. A
  receive's ``on_arrival`` hook (the receiver's header check and scatter of that chunk) runs on
  the receive waiter right after the wait, so a chunk is scattered while the next one is still
  on the wire and however rarely the engine polls; gloo's own I/O thread keeps filling the next
  posted receive meanwhile.

  Sends are *prepared and posted* off the engine thread by one *poster* thread per peer, in the
  order ``isend`` was called (FIFO: the pair's order is unchanged): it runs the send's
  ``before_post`` hook (the sender's gather of the chunk), posts it, and hands it to the peer's
  send waiter. Gloo sizes the socket's send buffer to the message and writes it in place inside
  ``isend`` (about 2 ms per 4 MB here), so the chunk is still in cache for that write; when the
  socket is full, gloo's I/O thread finishes the write while the poster gathers the next chunk,
  which gloo queues behind it, so the wire never waits for a thread to wake up. A pair's only
  chunk (the sender says so with ``may_post_inline``) that finds the poster idle is prepared and
  posted inline, as every send was before chunking: there is nothing to overlap, and on a busy
  machine the thread hop is a scheduling delay. Receives are posted by the caller.

  The wait is given a very long timeout of its own, because on expiry gloo fails every pair of
  the process group, not just the late op; deadlines are the sender's and receiver's
  ``timeout_s``.
- ``nccl`` moves device buffers directly and polls ``Work.is_completed()`` (a CUDA event). A
  send's ``before_post`` hook runs inline in ``isend``, queuing its gather on the caller's
  current stream, which NCCL's send then waits for; a receive's ``on_arrival`` hook runs inside
  the ``is_done()`` call that first sees completion. It has
  no tags, so ordering rests entirely on the sender issuing in ``seq_no`` order. NCCL cannot be
  run between two processes on a one-GPU machine, so this path shares every line above the two
  calls below with the gloo path that the tests run, and is itself untested here.

Both use one constant tag, so gloo matches messages of a pair first-posted-first-matched exactly
as NCCL does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from distserve.transfer.backend import (
    ArrivalHook,
    PendingOp,
    PostHook,
    TransferBackend,
    TransferBackendError,
    register_backend,
    run_hook,
)
from distserve.transfer.gloo_threads import PeerPoster, PeerWaiter, WaitedOp

_TAG = 0  # deliberately constant: see the module docstring


class _WorkOp(PendingOp):
    """An nccl op, polled through its CUDA event."""

    def __init__(self, work: Any, what: str, on_arrival: ArrivalHook | None) -> None:
        self._work = work
        self._what = what
        self._on_arrival = on_arrival
        self._error: str | None = None
        self._is_done = False

    def is_done(self) -> bool:
        if self._error is not None:
            raise TransferBackendError(self._error)
        if self._is_done:
            return True
        try:
            if not self._work.is_completed():
                return False
            self._work.wait()  # returns at once when completed; raises the op's error if any
        except Exception as err:  # the backends raise plain RuntimeError subclasses
            self._error = f"{self._what} failed: {err}"
            raise TransferBackendError(self._error) from err
        self._error = run_hook(self._on_arrival, self._what)
        if self._error is not None:
            raise TransferBackendError(self._error)
        self._is_done = True
        return True


class _TorchP2PBackend(TransferBackend):
    _needs: str  # backend name the process group must provide

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                f"the {self.name!r} transfer backend needs torch.distributed to be initialized "
                "(the launcher does this under torchrun)"
            )
        group_backend = str(dist.get_backend(group))
        if self._needs not in group_backend:
            raise RuntimeError(
                f"the {self.name!r} transfer backend needs a process group with {self._needs}, "
                f"got {group_backend!r}; init with backend='cpu:gloo,cuda:nccl' or pass "
                f"group=dist.new_group(backend={self._needs!r})"
            )
        self._group = group

    def _post_send(self, message: torch.Tensor, peer_rank: int) -> Any:
        return dist.isend(message, dst=peer_rank, group=self._group, tag=_TAG)

    def _post_recv(self, message: torch.Tensor, peer_rank: int) -> Any:
        return dist.irecv(message, src=peer_rank, group=self._group, tag=_TAG)

    def _what(self, message: torch.Tensor, peer_rank: int, is_send: bool) -> str:
        if is_send:
            return f"{self.name} isend of {message.numel()} bytes to rank {peer_rank}"
        return f"{self.name} irecv of {message.numel()} bytes from rank {peer_rank}"


@register_backend
class GlooBackend(_TorchP2PBackend):
    name = "gloo"
    _needs = "gloo"

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        allow_inline_posts: bool = True,
    ) -> None:
        super().__init__(group)
        self._allow_inline_posts = allow_inline_posts  # False: every send via the poster thread
        self._posters: dict[int, PeerPoster] = {}  # peer -> its send thread (then waiter)
        self._waiters: dict[int, PeerWaiter] = {}  # peer -> its receive waiter

    def wire_device(self, cache_device: torch.device) -> torch.device:
        return torch.device("cpu")

    def close(self) -> None:
        for poster in self._posters.values():
            poster.stop()  # and then its waiter, once it has handed on every op
        for waiter in self._waiters.values():
            waiter.stop()
        self._posters.clear()
        self._waiters.clear()

    def isend(
        self,
        message: torch.Tensor,
        peer_rank: int,
        before_post: PostHook | None = None,
        may_post_inline: bool = False,
    ) -> PendingOp:
        # Posted by the peer's send thread: see the module docstring.
        post = functools.partial(self._post_send, message, peer_rank)
        op = WaitedOp(self._what(message, peer_rank, True), post=post, before_post=before_post)
        if peer_rank not in self._posters:
            waiter = PeerWaiter(f"kv-transfer-send-wait-{peer_rank}")
            self._posters[peer_rank] = PeerPoster(f"kv-transfer-send-to-{peer_rank}", waiter)
        self._posters[peer_rank].submit(op, may_post_inline and self._allow_inline_posts)
        return op

    def irecv(
        self, message: torch.Tensor, peer_rank: int, on_arrival: ArrivalHook | None = None
    ) -> PendingOp:
        work = self._post_recv(message, peer_rank)
        op = WaitedOp(self._what(message, peer_rank, False), work=work, on_arrival=on_arrival)
        if peer_rank not in self._waiters:
            self._waiters[peer_rank] = PeerWaiter(f"kv-transfer-recv-from-{peer_rank}")
        self._waiters[peer_rank].add(op)
        return op


@register_backend
class NcclBackend(_TorchP2PBackend):
    name = "nccl"
    _needs = "nccl"

    def wire_device(self, cache_device: torch.device) -> torch.device:
        if cache_device.type != "cuda":
            raise ValueError(f"the nccl transfer backend needs a CUDA KV cache, got {cache_device}")
        return cache_device

    def isend(
        self,
        message: torch.Tensor,
        peer_rank: int,
        before_post: PostHook | None = None,
        may_post_inline: bool = False,
    ) -> PendingOp:
        what = self._what(message, peer_rank, True)
        error = run_hook(before_post, what)  # queues its copies on the current (transfer) stream
        if error is not None:
            raise TransferBackendError(error)
        return _WorkOp(self._post_send(message, peer_rank), what, None)

    def irecv(
        self, message: torch.Tensor, peer_rank: int, on_arrival: ArrivalHook | None = None
    ) -> PendingOp:
        work = self._post_recv(message, peer_rank)
        return _WorkOp(work, self._what(message, peer_rank, False), on_arrival)
