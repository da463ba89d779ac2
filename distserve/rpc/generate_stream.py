"""The server side of ``Generation.GenerateStream`` for any source of ``Generate`` answers.

``serve_generate_stream(calls, responses)`` is the response stream of one ``GenerateStream``
call: each request entry runs ``responses(request)`` (the very generator a ``Generate`` call
relays) in a task of its own on the pump of ``multiplex.py``; its messages become that
request's ``chunk`` events, a :class:`CallError` its ``error`` event; a cancel entry cancels
the task, which closes the generator (as a cancelled ``Generate`` call does). The router serves
it (``router/grpc_server.py``), and so do the SDK's test fake and the benchmark's bare relay.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable

from distserve._proto import generation_pb2
from distserve.rpc.multiplex import RequestPump

# Caps on one GenerateEvents message: well under gRPC's default 4 MiB receive limit of a client.
# An event's size is estimated from above: 5 bytes a token id, 4 a character of text, plus the
# instance names and framing.
MAX_EVENTS_PER_MESSAGE = 256
MAX_BYTES_PER_MESSAGE = 1 << 20
_EVENT_OVERHEAD_BYTES = 128

Responses = Callable[
    [generation_pb2.GenerateRequest], AsyncIterator[generation_pb2.GenerateResponse]
]


async def serve_generate_stream(
    calls: AsyncIterator[generation_pb2.GenerateCalls], responses: Responses
) -> AsyncGenerator[generation_pb2.GenerateEvents, None]:
    """The events of one ``GenerateStream`` call (see the module docstring)."""
    pump: RequestPump[generation_pb2.GenerateEvents] = RequestPump(
        generation_pb2.GenerateEvents,
        max_events=MAX_EVENTS_PER_MESSAGE,
        max_size=MAX_BYTES_PER_MESSAGE,
    )

    async def relay(rid: str, request: generation_pb2.GenerateRequest) -> None:
        chunks = responses(request)
        try:
            async for msg in chunks:
                size = _EVENT_OVERHEAD_BYTES + 5 * len(msg.token_ids) + 4 * len(msg.text)
                pump.push(size, request_id=rid, chunk=msg)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]  # cancelled: abort the request

    def start(call: generation_pb2.GenerateCall) -> None:
        kind = call.WhichOneof("kind")
        if kind == "request":
            pump.start(call.request.request_id, relay, call.request)
        elif kind == "cancel":
            pump.cancel(call.cancel)
        # an entry of a kind this server does not know: nothing to do

    batches = pump.serve(calls, start)
    try:
        async for events in batches:
            yield events
    finally:
        await batches.aclose()  # the stream ended: cancel what still runs, now
