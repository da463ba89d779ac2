"""The helper threads of the gloo backend: per peer, a receive waiter, a send poster and a send
waiter. Why they exist, and what runs on each, is explained in ``torch_backends.py``.

Owns :class:`WaitedOp` (a gloo op whose completion a thread reports), :class:`PeerWaiter`
(waits on a peer's posted ops in posting order, then runs a receive's ``on_arrival`` hook) and
:class:`PeerPoster` (runs a send's ``before_post`` hook and posts it, in submission order).
Nothing here knows about chunks or the cache.
"""

from __future__ import annotations

import datetime
import queue
import threading
from collections.abc import Callable
from typing import Any

from distserve.transfer import activity
from distserve.transfer.backend import (
    ArrivalHook,
    PendingOp,
    PostHook,
    TransferBackendError,
    run_hook,
)

_GLOO_WAIT = datetime.timedelta(days=7)  # see torch_backends.py: never let gloo time out first


class WaitedOp(PendingOp):
    """A gloo op that a :class:`PeerWaiter` thread waits for (a :class:`PeerPoster` prepares
    and posts sends first)."""

    def __init__(
        self,
        what: str,
        *,
        work: Any = None,
        post: Callable[[], Any] | None = None,
        before_post: PostHook | None = None,
        on_arrival: ArrivalHook | None = None,
    ) -> None:
        assert (work is None) != (post is None), "an op is either posted or to be posted"
        self.work = work  # the posted op's Work
        self.post = post  # posts the op and returns its Work; called once, on a peer thread
        self.before_post = before_post  # runs right before post
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


class PeerWaiter:
    """One daemon thread waiting, in posting order, on the gloo ops to or from one peer."""

    def __init__(self, name: str) -> None:
        self._ops: queue.SimpleQueue[WaitedOp | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, op: WaitedOp) -> None:
        assert op.work is not None, "only posted ops are waited on"
        self._ops.put(op)

    def stop(self) -> None:
        self._ops.put(None)

    def _run(self) -> None:
        while (op := self._ops.get()) is not None:
            try:
                op.work.wait(_GLOO_WAIT)
            except Exception as err:  # gloo raises RuntimeError subclasses
                op.error = f"{op.what} failed: {err}"
            else:
                op.error = run_hook(op.on_arrival, op.what)
            op.finished.set()
            activity.notify()


class PeerPoster:
    """One daemon thread preparing (``before_post``) and posting, in submission order, the sends
    to one peer, then handing each to the peer's send waiter. A send allowed to be posted
    inline that finds it idle is prepared and posted on the caller's thread instead."""

    def __init__(self, name: str, waiter: PeerWaiter) -> None:
        self._waiter = waiter
        self._lock = threading.Lock()
        self._num_unposted = 0  # under _lock: submitted to the thread and not yet posted
        self._ops: queue.SimpleQueue[WaitedOp | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, op: WaitedOp, may_post_inline: bool) -> None:
        with self._lock:
            is_idle = self._num_unposted == 0
            if not (may_post_inline and is_idle):
                self._num_unposted += 1
        if may_post_inline and is_idle:
            # Nothing is queued or being posted, and only this (the engine) thread submits:
            # posting here keeps the pair's order.
            self._post(op)
        else:
            self._ops.put(op)

    def stop(self) -> None:
        self._ops.put(None)

    def _post(self, op: WaitedOp) -> None:
        assert op.post is not None
        op.error = run_hook(op.before_post, op.what)
        if op.error is None:
            try:
                op.work = op.post()
            except Exception as err:  # a refused post: nothing is in flight for this op
                op.error = f"{op.what} failed: {err}"
        if op.error is not None:
            op.finished.set()
            activity.notify()
            return
        self._waiter.add(op)

    def _run(self) -> None:
        while (op := self._ops.get()) is not None:
            self._post(op)
            with self._lock:
                self._num_unposted -= 1
        self._waiter.stop()
