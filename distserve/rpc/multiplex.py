"""Many requests on one bidirectional gRPC stream: batched messages, one task per request.

Two services multiplex requests this way: an instance's ``Session`` with the router (server
half ``instance/session.py``, client half ``router/session.py``) and the router's public
``GenerateStream`` (server half ``generate_stream.py``, served by ``router/grpc_server.py``;
client half the SDK's multiplexed mode, ``client/_multiplex.py``). Their message types differ;
the pump does not. The server half::

    calls ──▶ reader ──on_call(entry)──▶ start(id, run) ──▶ one task per request
                │      cancel entry ──▶ cancel(id)                   │ push(event)
                ▼                                                    ▼
    events ◀── serve() (the response stream) ◀── Outbox: all events ready, one message

A request's life on the server half, by request id::

    start ─▶ task runs ─▶ events pushed ─▶ returns: done (its last event was pushed)
      │                                └─▶ raises CallError: one ``error`` event, done
      └─ empty or in-flight id: one INVALID_ARGUMENT ``error`` event, nothing runs
      └─ cancel(id), or the stream breaks: the task is cancelled (its code aborts the request)

When the peer half-closes, the requests already running finish, then the response stream
ends. A :class:`CallError` touches only its own request.

The client half (:class:`ClientStream`; each service's subclass opens its call, reads its
events and names its errors) builds on :class:`Outbox` (entries out) and :class:`Inbox` (one
request's events in)::

    callers ──entries──▶ Outbox ──writer task──calls──▶ server
    callers ◀── Inbox.get() ◀── one Inbox per request ◀── reader task ◀──events── server
                                  └─ an error is put in at the request's deadline
                                     (expire_after) or when the stream breaks

Batching: a message carries every entry ready when the stream can take one; what is made while
a message is being written gathers into the next. Nothing waits to fill a batch, so a lone
request pays no latency; under load many requests share one message's cost in the gRPC stack.

Owns no request logic and no message types: callers name them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M")  # a batch message type: SessionEvents, GenerateEvents, GenerateCalls, ...

STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}  # wire value -> StatusCode


class CallError(Exception):
    """A request failed with a gRPC status: raised by request logic, reported to its caller."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


# ---- one call per request: the same CallError as the RPC's status -------------------------
async def unary_call(awaitable: Awaitable[T], context: grpc.aio.ServicerContext) -> T:
    """The answer of a unary handler; a :class:`CallError` ends the RPC with its status."""
    try:
        return await awaitable
    except CallError as exc:
        await context.abort(exc.code, exc.details)
        raise  # not reached: abort raises


async def stream_call(
    chunks: AsyncIterator[T], context: grpc.aio.ServicerContext
) -> AsyncIterator[T]:
    """Relay a streaming handler's messages; a :class:`CallError` ends the RPC with its status."""
    try:
        async for chunk in chunks:
            yield chunk
    except CallError as exc:
        await context.abort(exc.code, exc.details)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


class Outbox(Generic[M]):
    """Batch messages waiting to be sent, oldest first; the last one takes new entries until it
    holds ``max_entries`` or ``max_size`` (an upper estimate of the encoded bytes, or any unit
    the caller counts in; an entry larger than that goes alone in a message)."""

    def __init__(
        self, new_message: Callable[[], M], field: str, *, max_entries: int, max_size: int
    ) -> None:
        self.new_message = new_message
        self.field = field  # the batch message's repeated field of entries
        self.max_entries = max_entries
        self.max_size = max_size
        self.messages: collections.deque[M] = collections.deque()
        self.last_size = 0  # the size of what the last message holds
        self.wake = asyncio.Event()  # set when an entry is added (or the sender must look again)

    def add(self, size: int, **fields: Any) -> Any:
        """Append an entry made from ``fields`` to the message that takes it; returns the entry."""
        entries = getattr(self.messages[-1], self.field) if self.messages else None
        if (
            entries is None
            or len(entries) >= self.max_entries
            or self.last_size + size > self.max_size
        ):
            self.messages.append(self.new_message())
            self.last_size = 0
            entries = getattr(self.messages[-1], self.field)
        self.last_size += size
        self.wake.set()
        return entries.add(**fields)

    def take(self) -> M | None:
        """The oldest message, or None when nothing waits."""
        if not self.messages:
            return None
        message = self.messages.popleft()
        if not self.messages:
            self.last_size = 0
        return message

    def clear(self) -> None:
        self.messages.clear()
        self.last_size = 0


class Inbox:
    """One request's events on the client half, in arrival order. An exception put here (a
    deadline, a broken stream) is raised by :meth:`get` when its turn comes."""

    __slots__ = ("items", "loop", "timer", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self.loop = loop
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None  # the request's deadline, if any

    def expire_after(self, delay_s: float, make_error: Callable[[], BaseException]) -> None:
        """The request's deadline: ``make_error()`` is put here in ``delay_s`` seconds unless
        :meth:`cancel_timer` is called first (when the request is released or its stream ends)."""
        self.cancel_timer()
        self.timer = self.loop.call_later(delay_s, self._expire, make_error)

    def _expire(self, make_error: Callable[[], BaseException]) -> None:
        self.timer = None
        self.put(make_error())

    def put(self, item: Any) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> Any:
        while not self.items:
            self.waiter = self.loop.create_future()
            await self.waiter
        item = self.items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class ClientStream(Generic[M]):
    """The client half of one open stream: each request's :class:`Inbox`, the :class:`Outbox`
    of entries, the writer and reader tasks, and ending the stream. Subclasses (the router's
    ``Session`` to an instance, the SDK's ``GenerateStream``) open the call, write ``_write``
    around :meth:`_send` and ``_read`` into :attr:`inboxes`, and say what a broken stream's
    requests fail with (:meth:`_end`)."""

    def __init__(self, call: Any, outbox: Outbox[M]) -> None:
        self.loop = asyncio.get_running_loop()
        self.call = call
        self.outbox = outbox
        self.inboxes: dict[str, Inbox] = {}  # request id -> its events
        self.is_dead = False
        self.writer = self.loop.create_task(self._write())
        self.reader = self.loop.create_task(self._read())

    async def _write(self) -> None:
        raise NotImplementedError

    async def _read(self) -> None:
        raise NotImplementedError

    def _open(
        self,
        rid: str,
        size: int,
        timeout_s: float | None,
        deadline_error: Callable[[], BaseException],
        /,
        **entry: Any,
    ) -> Inbox:
        """Queue ``entry`` for the next message; the inbox of ``rid``'s events."""
        inbox = Inbox(self.loop)
        if timeout_s is not None:
            inbox.expire_after(timeout_s, deadline_error)
        self.inboxes[rid] = inbox
        self.outbox.add(size, **entry)
        return inbox

    def _release(self, rid: str, tell_peer: bool, size: int, /, **cancel_entry: Any) -> None:
        """The caller is done with ``rid``; ``tell_peer``: queue ``cancel_entry`` (the peer may
        still be running the request)."""
        inbox = self.inboxes.pop(rid, None)
        if inbox is None:
            return
        inbox.cancel_timer()
        if tell_peer and not self.is_dead:
            self.outbox.add(size, **cancel_entry)

    async def _send(self) -> None:
        """Write every message as entries arrive; returns only by raising (the call failed)."""
        while True:
            await self.outbox.wake.wait()
            self.outbox.wake.clear()
            while (message := self.outbox.take()) is not None:
                # While this write is in flight, new entries gather into the next message.
                await self.call.write(message)

    def _end(self, error: Callable[[], BaseException]) -> bool:
        """End the stream (False: it had ended already): cancel the call, which makes the peer
        abort what it still runs, and the other task; every open request gets ``error()``."""
        if self.is_dead:
            return False
        self.is_dead = True
        self.call.cancel()
        current = asyncio.current_task()
        for task in (self.writer, self.reader):
            if task is not current:
                task.cancel()
        for inbox in self.inboxes.values():
            inbox.cancel_timer()
            inbox.put(error())
        self.inboxes.clear()
        self.outbox.clear()
        return True


class RequestPump(Generic[M]):
    """The server half for one stream: a task per request, and the events waiting to be sent.

    ``new_message`` makes an empty batch of events (a message with a repeated ``events`` field
    whose entries have ``request_id`` and an ``error`` with ``code`` and ``details``).
    """

    def __init__(self, new_message: Callable[[], M], *, max_events: int, max_size: int) -> None:
        self.outbox: Outbox[M] = Outbox(
            new_message, "events", max_entries=max_events, max_size=max_size
        )
        self.tasks: dict[str, asyncio.Task[None]] = {}  # request id -> the task serving it
        self.is_reading = True  # the peer may still send entries

    async def serve(
        self, calls: AsyncIterator[Any], on_call: Callable[[Any], None]
    ) -> AsyncGenerator[M, None]:
        """The response stream: ``on_call`` sees each entry of each ``calls`` message (their
        repeated ``calls`` field) in order and starts or cancels requests."""
        reader = asyncio.ensure_future(self._read(calls, on_call))
        try:
            while (batch := await self._next()) is not None:
                yield batch
        finally:
            reader.cancel()
            await self.stop()
            await asyncio.gather(reader, return_exceptions=True)

    # ---- entries in ----------------------------------------------------------------------
    async def _read(self, calls: AsyncIterator[Any], on_call: Callable[[Any], None]) -> None:
        try:
            async for message in calls:
                for call in message.calls:
                    on_call(call)
        except Exception as exc:  # the stream broke: serve() is cancelled as well
            logger.debug("multiplexed stream ended: %s", exc)
        finally:
            self.is_reading = False
            self.outbox.wake.set()

    def start(self, rid: str, run: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Serve request ``rid`` with ``run(rid, *args)`` in a task of its own; an empty id, or
        one still in flight on this stream, gets an INVALID_ARGUMENT event and runs nothing."""
        if not rid or rid in self.tasks:
            why = f"request {rid} is already running" if rid else "request_id is required"
            self.fail(rid, CallError(grpc.StatusCode.INVALID_ARGUMENT, why))
            return
        task = asyncio.ensure_future(self._run(rid, run(rid, *args)))
        self.tasks[rid] = task
        task.add_done_callback(functools.partial(self._done, rid))

    def cancel(self, rid: str) -> None:
        """Stop request ``rid`` (cancelling its task aborts it); unknown ids are ignored."""
        task = self.tasks.get(rid)
        if task is not None:
            task.cancel()

    async def _run(self, rid: str, work: Awaitable[None]) -> None:
        try:
            await work
        except CallError as exc:
            self.fail(rid, exc)
        except Exception as exc:  # a bug: that request fails, the stream goes on
            logger.exception("request %s failed", rid)
            self.fail(rid, CallError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"))

    def _done(self, rid: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(rid) is task:
            del self.tasks[rid]
        if not self.is_reading and not self.tasks:
            self.outbox.wake.set()  # the last request of a half-closed stream finished

    # ---- events out ----------------------------------------------------------------------
    def push(self, size: int, **fields: Any) -> Any:
        """Queue an event made from ``fields`` (``size`` as :class:`Outbox` counts it)."""
        return self.outbox.add(size, **fields)

    def fail(self, rid: str, exc: CallError) -> None:
        """Queue request ``rid``'s ``error`` event."""
        event = self.outbox.add(0, request_id=rid)
        event.error.code = exc.code.value[0]
        event.error.details = exc.details

    async def _next(self) -> M | None:
        """The oldest batch of events; None once the peer half-closed and all is answered."""
        while (batch := self.outbox.take()) is None:
            if not self.is_reading and not self.tasks:
                return None
            self.outbox.wake.clear()
            await self.outbox.wake.wait()
        return batch

    async def stop(self) -> None:
        """Cancel every request still running (each aborts itself)."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
