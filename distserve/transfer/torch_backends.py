"""The torch.distributed backends: ``gloo`` (host buffers) and ``nccl`` (device buffers).

Owns only the thin mapping from :class:`TransferBackend` to ``dist.isend``/``dist.irecv`` on a
process group that spans both instances (the default world group unless one is given). Which
group exists, and its init, belong to the launcher.

- ``gloo`` moves host buffers. With a CUDA cache the sender gathers on the device and copies into
  a pinned host message, and the receiver copies back before scattering (see ``sender.py``).
  Gloo's point-to-point ``Work`` cannot be polled: ``is_completed()`` stays False until someone
  calls ``wait()``, and it has no future. So each (peer, direction) gets one daemon thread that
  ``wait()``s that peer's ops in posting order (the order they complete in: one TCP connection,
  first-posted-first-matched) and flags them done; ``wait()`` releases the GIL.

  Sends are also *posted* by that thread, in the order ``isend`` was called (its queue is FIFO,
  so a pair's order is unchanged): gloo's ``isend`` writes as much of the message into the
  socket as it takes before returning — about 2 ms of copying per 4 MB on the test machine —
  and on the engine thread that copy would run after, not during, the gather of the next chunk.
  Receives are posted at once by the caller (posting one copies nothing). A receive's
  ``on_arrival`` hook (the receiver's header check and scatter of that chunk) runs on its
  thread right after the wait, so a chunk is scattered while the next one is still on the wire
  and however rarely the engine polls; gloo's own I/O thread keeps filling the next posted
  receive meanwhile.

  The wait is given a very long timeout of its own, because on expiry gloo fails every pair of
  the process group, not just the late op; deadlines are the sender's and receiver's
  ``timeout_s``.
- ``nccl`` moves device buffers directly and polls ``Work.is_completed()`` (a CUDA event); the
  ``on_arrival`` hook runs inside the ``is_done()`` call that first sees completion. It has
  no tags, so ordering rests entirely on the sender issuing in ``seq_no`` order. NCCL cannot be
  run between two processes on a one-GPU machine, so this path shares every line above the two
  calls below with the gloo path that the tests run, and is itself untested here.

Both use one constant tag, so gloo matches messages of a pair first-posted-first-matched exactly
as NCCL does.
"""

from __future__ import annotations

import datetime
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from distserve.transfer.backend import (
    ArrivalHook,
    PendingOp,
    TransferBackend,
    TransferBackendError,
    register_backend,
    run_arrival_hook,
)

_TAG = 0  # deliberately constant: see the module docstring
_GLOO_WAIT = datetime.timedelta(days=7)  # see the module docstring: never let gloo time out first


class _WorkOp(PendingOp):
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
        self._error = run_arrival_hook(self._on_arrival, self._what)
        if self._error is not None:
            raise TransferBackendError(self._error)
        self._is_done = True
        return True


class _WaitedOp(PendingOp):
    """A gloo op that a :class:`_PeerWaiter` thread posts (sends) and waits for."""

    def __init__(
        self, post: Callable[[], Any], what: str, on_arrival: ArrivalHook | None = None
    ) -> None:
        self.post = post  # returns the op's Work; called once, on the peer's thread
        self.what = what
        self.on_arrival = on_arrival
        self.error: str | None = None
        self.finished = threading.Event()

    def is_done(self) -> bool:
        if not self.finished.is_set():
            return False
        if self.error is not None:
            raise TransferBackendError(self.error)
        return True


class _PeerWaiter:
    """One daemon thread posting (if not yet posted) and then waiting on, in order, the gloo
    ops to or from one peer."""

    def __init__(self, name: str) -> None:
        self._ops: queue.SimpleQueue[_WaitedOp | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, op: _WaitedOp) -> None:
        self._ops.put(op)

    def stop(self) -> None:
        self._ops.put(None)

    def _run(self) -> None:
        while (op := self._ops.get()) is not None:
            try:
                op.post().wait(_GLOO_WAIT)
            except Exception as err:  # gloo raises RuntimeError subclasses
                op.error = f"{op.what} failed: {err}"
            else:
                op.error = run_arrival_hook(op.on_arrival, op.what)
            op.finished.set()


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

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(group)
        self._waiters: dict[tuple[int, bool], _PeerWaiter] = {}

    def wire_device(self, cache_device: torch.device) -> torch.device:
        return torch.device("cpu")

    def close(self) -> None:
        for waiter in self._waiters.values():
            waiter.stop()
        self._waiters.clear()

    def isend(self, message: torch.Tensor, peer_rank: int) -> PendingOp:
        # Posted by the peer's send thread: see the module docstring.
        post = functools.partial(self._post_send, message, peer_rank)
        return self._wait_on(_WaitedOp(post, self._what(message, peer_rank, True)), peer_rank, True)

    def irecv(
        self, message: torch.Tensor, peer_rank: int, on_arrival: ArrivalHook | None = None
    ) -> PendingOp:
        work = self._post_recv(message, peer_rank)
        op = _WaitedOp(lambda: work, self._what(message, peer_rank, False), on_arrival)
        return self._wait_on(op, peer_rank, False)

    def _wait_on(self, op: _WaitedOp, peer_rank: int, is_send: bool) -> PendingOp:
        key = (peer_rank, is_send)
        if key not in self._waiters:
            direction = "send-to" if is_send else "recv-from"
            self._waiters[key] = _PeerWaiter(f"kv-transfer-{direction}-{peer_rank}")
        self._waiters[key].add(op)
        return op


@register_backend
class NcclBackend(_TorchP2PBackend):
    name = "nccl"
    _needs = "nccl"

    def wire_device(self, cache_device: torch.device) -> torch.device:
        if cache_device.type != "cuda":
            raise ValueError(f"the nccl transfer backend needs a CUDA KV cache, got {cache_device}")
        return cache_device

    def isend(self, message: torch.Tensor, peer_rank: int) -> PendingOp:
        work = self._post_send(message, peer_rank)
        return _WorkOp(work, self._what(message, peer_rank, True), None)

    def irecv(
        self, message: torch.Tensor, peer_rank: int, on_arrival: ArrivalHook | None = None
    ) -> PendingOp:
        work = self._post_recv(message, peer_rank)
        return _WorkOp(work, self._what(message, peer_rank, False), on_arrival)
