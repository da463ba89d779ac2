"""A process-wide "some transfer op finished" signal, so that an idle engine thread can sleep.

A decode instance with nothing to decode but KV pulls in flight (or a prefill instance whose
only work is sends) would otherwise tick ``poll()`` back to back: thousands of empty steps a
second, each taking the GIL and the core from the threads that move the bytes and from the gRPC
side. Instead its engine loop waits on an event, and the backends call :func:`notify` whenever
one of their ops settles on a helper thread (gloo: the peer waiter, after any arrival hook ran;
a refused post). Backends that complete ops only inside ``poll()`` (nccl, the in-process fabric)
never notify: the loop's wait is bounded, so they are polled at that interval instead.

Listeners run on the notifying thread and must be cheap and never raise (``Event.set``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_lock = threading.Lock()
_listeners: tuple[Callable[[], None], ...] = ()


def add_listener(fn: Callable[[], None]) -> None:
    global _listeners
    with _lock:
        _listeners = (*_listeners, fn)


def remove_listener(fn: Callable[[], None]) -> None:
    global _listeners
    with _lock:
        _listeners = tuple(f for f in _listeners if f is not fn)


def notify() -> None:
    """An op settled: wake every listener (an idle engine loop re-polls its transfers)."""
    for fn in _listeners:  # a snapshot: add/remove replace the tuple
        fn()
