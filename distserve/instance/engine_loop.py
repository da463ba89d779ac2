"""The driver's engine thread, and how the asyncio gRPC side talks to it.

The engine and everything it owns (scheduler, KV manager, leases) are touched only by this
thread. The servicer hands it work with :meth:`EngineLoop.call` (a function to run between two
steps, whose result comes back as an awaitable) and receives tokens on a per-request
``asyncio.Queue`` that the engine thread feeds through ``call_soon_threadsafe``.

    gRPC handler (asyncio)                 engine thread
    ──────────────────────                 ─────────────
    await loop.call(fn) ───── inbox ─────▶ fn()  (between steps)
    await stream.get() ◀── call_soon_threadsafe ── role.on_outputs(...)  (one call per step)
                                           step() when there is work, else wait on the inbox

Two things keep the serving side from stealing the engine's core (an instance is often pinned
to one core, and the asyncio thread shares the GIL with it):

- A step's stream items go to the asyncio loop in one ``call_soon_threadsafe`` (one wake-up of
  the loop's self-pipe, one GIL hand-off), not one per request.
- When the only work is KV transfers in flight (nothing to schedule), the loop does not tick
  ``step()`` back to back: after a tick that finished nothing it waits for the next transfer
  event (``distserve.transfer.activity``: gloo's helper threads notify), the inbox, or at most
  ``_TRANSFER_POLL_S`` (backends that never notify are polled at that pace).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from distserve.engine.llm_engine import LLMEngine
from distserve.transfer import activity

logger = logging.getLogger(__name__)

T = TypeVar("T")
_IDLE_WAIT_S = 0.02  # how long an idle loop sleeps before re-checking timers (leases, transfers)
_TRANSFER_POLL_S = 0.002  # longest wait between transfer-only ticks (a notify wakes it sooner)


@dataclass
class StreamItem:
    """What the engine thread sends to a request's stream."""

    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None  # the request failed; the handler reports it to its caller
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first item)
    payload: Any = None  # role-specific extras (the prefill's KV handle, transfer stats)


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        role: Any,
        aio_loop: asyncio.AbstractEventLoop,
        on_transfers: Callable[[list], None] | None = None,
    ) -> None:
        self.engine = engine
        self.role = role  # a distserve.instance.roles.RoleHandler
        self._on_transfers = on_transfers  # observes every finished transfer (metrics)
        self._aio = aio_loop
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = (
            queue.SimpleQueue()
        )
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue[StreamItem]] = {}
        self._outbox: list[tuple[asyncio.Queue[StreamItem], StreamItem]] = []  # engine thread only
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.last_step_s = 0.0
        self.error: BaseException | None = None

    # ---- called from asyncio -------------------------------------------------------------
    def start(self) -> None:
        activity.add_listener(self._wake.set)
        self._thread.start()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between steps; its return value or exception."""
        if self.error is not None:
            raise RuntimeError(f"the engine loop has failed: {self.error}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def open_stream(self, request_id: str) -> asyncio.Queue[StreamItem]:
        q: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._streams[request_id] = q
        return q

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopped.set()
        self._wake.set()
        activity.remove_listener(self._wake.set)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ---- called from the engine thread ---------------------------------------------------
    def emit(self, request_id: str, item: StreamItem) -> None:
        """Queue ``item`` for its stream; sent with the rest of this step's by :meth:`_flush`."""
        q = self._streams.get(request_id)
        if q is not None:
            self._outbox.append((q, item))

    def _flush(self) -> None:
        if self._outbox:
            items, self._outbox = self._outbox, []
            self._aio.call_soon_threadsafe(_deliver, items)

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain_inbox()
                self.role.before_step()
                self._flush()
                if not self._has_work():
                    self._wait(_IDLE_WAIT_S)
                    continue
                transfers_only = self._transfers_only()
                start = time.monotonic()
                outputs = self.engine.step()
                if self.engine.last_step_was_idle:
                    # Work is waiting but none can run (e.g. the pool is full of leased blocks):
                    # sleep until something arrives instead of spinning on the GIL and the core.
                    self._wait(_IDLE_WAIT_S)
                    continue
                transfers = self.engine.drain_transfer_results()
                if not transfers_only:
                    self.last_step_s = time.monotonic() - start
                self.role.on_outputs(outputs)
                if transfers and self._on_transfers is not None:
                    self._on_transfers(transfers)
                self.role.on_transfer_results(transfers)
                self._flush()
                if transfers_only and not transfers:
                    # Nothing arrived: wait for a transfer event instead of ticking again.
                    self._wait(_TRANSFER_POLL_S)
        except BaseException as exc:  # the loop must never die silently
            logger.exception("engine loop failed")
            self.error = exc
            for rid in list(self._streams):
                self.emit(rid, StreamItem([], "abort", error=f"engine failure: {exc}"))
            self._flush()
            self._fail_inbox(exc)

    def _wait(self, timeout_s: float) -> None:
        self._wake.wait(timeout_s)
        self._wake.clear()  # whatever set it is looked at by the next iteration

    def _transfers_only(self) -> bool:
        """The next step can only tick KV transfers: nothing is queued or running."""
        engine = self.engine
        sched = engine.scheduler
        return not (sched.waiting or sched.running or engine.has_pending_ops)

    def _has_work(self) -> bool:
        engine = self.engine
        sched = engine.scheduler
        return bool(
            sched.waiting
            or sched.running
            or engine.num_transfers_in_flight
            or engine.has_pending_ops
        )

    def _drain_inbox(self) -> None:
        """Run what the asyncio side asked for (before the step, so a pull or a new request is
        seen by this step's scheduling)."""
        while True:
            try:
                fn, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _fail_inbox(self, exc: BaseException) -> None:
        while True:
            try:
                _, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError(f"the engine loop has failed: {exc}"))


def _deliver(items: list[tuple[asyncio.Queue[StreamItem], StreamItem]]) -> None:
    """On the asyncio loop: one step's stream items, in the engine's order."""
    for q, item in items:
        q.put_nowait(item)
