"""The instance side of the router's requests: per-request errors, the per-request RPCs, and
the ``Session`` stream that multiplexes them.

An instance's request logic (real: ``servicer.py``; simulated: ``simulated.py``) is written
once, as a :class:`RequestHandler`: ``prefill`` returns a ``PrefillResponse``; ``decode`` and
``generate`` yield ``TokenChunk``\\ s; a request that cannot be served raises
:class:`CallError` (a status code and a sentence). Cancelling the task that runs one of them
aborts that request on the instance. Two ways in share that logic:

- the per-request RPCs (``Prefill``, ``Decode``, ``Generate``, in :class:`RequestRPCs`):
  ``rpc.multiplex``'s ``unary_call`` and ``stream_call`` turn a :class:`CallError` into the
  RPC's status;
- the ``Session`` stream (:func:`serve_session`), one per router::

      SessionCalls ──▶ reader ──▶ one task per entry ──▶ handler.prefill / decode / generate
                          │ abort entry: cancel that request's task     │ each answer
                          ▼                                             ▼
      SessionEvents ◀── response generator ◀── batches ◀──── events (prefill | tokens | error)

  Each outgoing message carries every event that is ready when the stream can take one.
  A :class:`CallError` becomes that request's ``error`` event and touches no other request.
  When the router half-closes the stream, the requests already running finish first; when
  the stream is cancelled (the router went away), every request's task is cancelled, which
  aborts it on the instance. The pump itself (tasks, batches, half-close) is
  ``distserve/rpc/multiplex.py``, shared with the router's client-facing ``GenerateStream``;
  this module says what a Session entry starts.

This module owns none of the request logic and no engine state.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc

from distserve import timeline
from distserve._proto import instance_pb2, instance_pb2_grpc
from distserve.rpc.multiplex import CallError, RequestPump, stream_call, unary_call

logger = logging.getLogger(__name__)

# Caps on one SessionEvents message, so that a burst of events never meets the peer's message
# size limit: an event's size is counted in token ids (a token id is at most 5 bytes on the
# wire; 1M ids stay far below 64 MiB).
MAX_EVENTS_PER_MESSAGE = 256
MAX_TOKENS_PER_MESSAGE = 1 << 20


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
class RequestRPCs(instance_pb2_grpc.InstanceServicer):
    """The ``Instance`` RPCs that only adapt a :class:`RequestHandler`: ``Prefill``, ``Decode``
    and ``Generate`` one call per request, and the router's ``Session`` stream. Real and
    simulated instances inherit these and write only the request logic."""

    async def Prefill(
        self, request: instance_pb2.EngineRequest, context: grpc.aio.ServicerContext
    ) -> instance_pb2.PrefillResponse:
        return await unary_call(self.prefill(request), context)  # type: ignore[attr-defined]

    async def Decode(
        self, request: instance_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[instance_pb2.TokenChunk]:
        async for chunk in stream_call(self.decode(request), context):  # type: ignore[attr-defined]
            yield chunk

    async def Generate(
        self, request: instance_pb2.EngineRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[instance_pb2.TokenChunk]:
        async for chunk in stream_call(self.generate(request), context):  # type: ignore[attr-defined]
            yield chunk

    async def Session(
        self,
        request_iterator: AsyncIterator[instance_pb2.SessionCalls],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[instance_pb2.SessionEvents]:
        async for events in serve_session(self, request_iterator):  # type: ignore[arg-type]
            yield events


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
    batches = session.pump.serve(calls, session.start)
    try:
        async for events in batches:
            yield events
    finally:
        await batches.aclose()  # the stream ended: cancel what still runs, now


class _Session:
    """What each entry of one Session stream starts, on the shared pump."""

    def __init__(self, handler: RequestHandler) -> None:
        self.handler = handler
        self.pump: RequestPump[instance_pb2.SessionEvents] = RequestPump(
            instance_pb2.SessionEvents,
            max_events=MAX_EVENTS_PER_MESSAGE,
            max_size=MAX_TOKENS_PER_MESSAGE,
        )

    def start(self, call: instance_pb2.SessionCall) -> None:
        kind = call.WhichOneof("kind")
        if kind == "abort":
            # the request's handler aborts it on the instance; the router expects no event
            self.pump.cancel(call.abort)
        elif kind == "prefill":
            timeline.mark(call.prefill.request_id, "instance.recv")
            self.pump.start(call.prefill.request_id, self._prefill, call.prefill)
        elif kind == "decode":
            rid = call.decode.request.request_id
            self.pump.start(rid, self._stream, self.handler.decode, call.decode)
        elif kind == "generate":
            rid = call.generate.request_id
            timeline.mark(rid, "instance.recv")
            self.pump.start(rid, self._stream, self.handler.generate, call.generate)
        else:
            logger.warning("session call of unknown kind %r ignored", kind)

    async def _prefill(self, rid: str, request: instance_pb2.EngineRequest) -> None:
        response = await self.handler.prefill(request)
        timeline.mark(rid, "instance.answered")
        self.pump.push(0, request_id=rid, prefill=response)

    async def _stream(
        self,
        rid: str,
        handle: Callable[..., AsyncIterator[instance_pb2.TokenChunk]],
        request: instance_pb2.EngineRequest | instance_pb2.DecodeRequest,
    ) -> None:
        chunks = handle(request)
        try:
            async for chunk in chunks:
                self.pump.push(len(chunk.token_ids), request_id=rid, tokens=chunk)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
