"""The instance side of the router's requests: per-request errors, the per-request RPCs, and
the ``Session`` stream that multiplexes them.

An instance's request logic (real: ``servicer.py``; simulated: ``simulated.py``) is written
once, as a :class:`RequestHandler`: ``prefill`` returns a ``PrefillResponse``; ``decode`` and
``generate`` yield ``TokenChunk``\\ s; a request that cannot be served raises
:class:`CallError` (a status code and a sentence). Cancelling the task that runs one of them
aborts that request on the instance. Two ways in share that logic:

- the per-request RPCs (``Prefill``, ``Decode``, ``Generate``): :func:`unary_call` and
  :func:`stream_call` turn a :class:`CallError` into the RPC's status;
- the ``Session`` stream (:func:`serve_session`), one per router::

      SessionCalls ──▶ reader ──▶ one task per entry ──▶ handler.prefill / decode / generate
                          │ abort entry: cancel that request's task     │ each answer
                          ▼                                             ▼
      SessionEvents ◀── response generator ◀── batches ◀──── events (prefill | tokens | error)

  Each outgoing message carries every event that is ready when the stream can take one.
  A :class:`CallError` becomes that request's ``error`` event and touches no other request.
  When the router half-closes the stream, the requests already running finish first; when
  the stream is cancelled (the router went away), every request's task is cancelled, which
  aborts it on the instance.

This module owns none of the request logic and no engine state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, TypeVar

import grpc

from distserve._proto import instance_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Caps on one SessionEvents message, so that a burst of events never meets the peer's message
# size limit (a token id is at most 5 bytes on the wire; 1M ids stay far below 64 MiB).
MAX_EVENTS_PER_MESSAGE = 256
MAX_TOKENS_PER_MESSAGE = 1 << 20


class CallError(Exception):
    """A request failed with a gRPC status: raised by request logic, reported to its caller."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class RequestHandler(Protocol):
    """An instance's request logic, shared by the per-request RPCs and the Session stream."""

    async def prefill(self, request: instance_pb2.EngineRequest) -> instance_pb2.PrefillResponse:
        """The prompt's first token and where its KV waits; raises :class:`CallError`."""
        ...

    def decode(self, request: instance_pb2.DecodeRequest) -> AsyncIterator[instance_pb2.TokenChunk]:
        """Pull the KV, then the remaining tokens; the last chunk has a finish reason."""
        ...

    def generate(
        self, request: instance_pb2.EngineRequest
    ) -> AsyncIterator[instance_pb2.TokenChunk]:
        """Both phases on this (colocated) instance; the last chunk has a finish reason."""
        ...


# ---- per-request RPCs ----------------------------------------------------------------------
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


def call_error(exc: ValueError | RuntimeError) -> CallError:
    """The status of an engine's refusal: bad input is INVALID_ARGUMENT, anything else
    (the engine failed, it is shutting down) UNAVAILABLE."""
    code = grpc.StatusCode.INVALID_ARGUMENT
    if not isinstance(exc, ValueError):
        code = grpc.StatusCode.UNAVAILABLE
    return CallError(code, str(exc))


# ---- the Session stream --------------------------------------------------------------------
async def serve_session(
    handler: RequestHandler, calls: AsyncIterator[instance_pb2.SessionCalls]
) -> AsyncIterator[instance_pb2.SessionEvents]:
    """The ``Session`` RPC's response stream for one router (see the module docstring)."""
    session = _Session(handler)
    reader = asyncio.ensure_future(session.read(calls))
    try:
        while True:
            batch = await session.next_batch()
            if batch is None:
                return
            yield batch
    finally:
        reader.cancel()
        await session.stop()
        await asyncio.gather(reader, return_exceptions=True)


class _Session:
    """One Session stream's requests: their tasks, and the events waiting to be sent."""

    def __init__(self, handler: RequestHandler) -> None:
        self.handler = handler
        self.tasks: dict[str, asyncio.Task[None]] = {}  # request id -> the task serving it
        self.batches: list[instance_pb2.SessionEvents] = []  # oldest first; the last one fills
        self.num_batch_tokens = 0  # token ids in the last batch
        self.wake = asyncio.Event()  # set when a batch is ready or the session may end
        self.is_reading = True  # the router may still send calls

    # ---- calls in ------------------------------------------------------------------------
    async def read(self, calls: AsyncIterator[instance_pb2.SessionCalls]) -> None:
        try:
            async for message in calls:
                for call in message.calls:
                    self.start(call)
        except Exception as exc:  # the stream broke: the handler is cancelled as well
            logger.debug("session stream ended: %s", exc)
        finally:
            self.is_reading = False
            self.wake.set()

    def start(self, call: instance_pb2.SessionCall) -> None:
        kind = call.WhichOneof("kind")
        if kind == "abort":
            task = self.tasks.get(call.abort)
            if task is not None:
                task.cancel()  # its handler aborts the request; the router expects no event
            return
        if kind == "decode":
            rid = call.decode.request.request_id
        elif kind in ("prefill", "generate"):
            rid = getattr(call, kind).request_id
        else:
            logger.warning("session call of unknown kind %r ignored", kind)
            return
        if not rid or rid in self.tasks:
            why = f"request {rid} is already running" if rid else "request_id is required"
            self.error(rid, CallError(grpc.StatusCode.INVALID_ARGUMENT, why))
            return
        if kind == "prefill":
            coro: Awaitable[None] = self._prefill(rid, call.prefill)
        elif kind == "decode":
            coro = self._stream(rid, self.handler.decode(call.decode))
        else:
            coro = self._stream(rid, self.handler.generate(call.generate))
        task = asyncio.ensure_future(coro)
        self.tasks[rid] = task
        task.add_done_callback(functools.partial(self._done, rid))

    def _done(self, rid: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(rid) is task:
            del self.tasks[rid]
        if not self.is_reading and not self.tasks:
            self.wake.set()  # the last request of a half-closed session finished

    async def _prefill(self, rid: str, request: instance_pb2.EngineRequest) -> None:
        try:
            response = await self.handler.prefill(request)
        except CallError as exc:
            self.error(rid, exc)
        except Exception as exc:  # a bug: that request fails, the session goes on
            logger.exception("prefill %s failed", rid)
            self.error(rid, CallError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        else:
            self._add(0).add(request_id=rid, prefill=response)
            self.wake.set()

    async def _stream(self, rid: str, chunks: AsyncIterator[instance_pb2.TokenChunk]) -> None:
        try:
            async for chunk in chunks:
                self._add(len(chunk.token_ids)).add(request_id=rid, tokens=chunk)
                self.wake.set()
        except CallError as exc:
            self.error(rid, exc)
        except Exception as exc:
            logger.exception("request %s failed", rid)
            self.error(rid, CallError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    # ---- events out ----------------------------------------------------------------------
    def error(self, rid: str, exc: CallError) -> None:
        error = instance_pb2.SessionError(code=exc.code.value[0], details=exc.details)
        self._add(0).add(request_id=rid, error=error)
        self.wake.set()

    def _add(self, num_tokens: int) -> Any:
        """The events of the batch an event of ``num_tokens`` token ids goes into."""
        if (
            not self.batches
            or len(self.batches[-1].events) >= MAX_EVENTS_PER_MESSAGE
            or self.num_batch_tokens + num_tokens > MAX_TOKENS_PER_MESSAGE
        ):
            self.batches.append(instance_pb2.SessionEvents())
            self.num_batch_tokens = 0
        self.num_batch_tokens += num_tokens
        return self.batches[-1].events

    async def next_batch(self) -> instance_pb2.SessionEvents | None:
        """The oldest batch of events; None once the router half-closed and all is answered."""
        while not self.batches:
            if not self.is_reading and not self.tasks:
                return None
            self.wake.clear()
            await self.wake.wait()
        batch = self.batches.pop(0)
        if not self.batches:
            self.num_batch_tokens = 0
        return batch

    async def stop(self) -> None:
        """Cancel every request still running (each aborts itself on the instance)."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
