"""The SDK's multiplexed mode: every request of an :class:`AsyncClient` on one ``GenerateStream``.

A gRPC call costs the client (and the router) several times the CPU of a message on a stream
that is already open, and a message can carry a batch. So by default an ``AsyncClient`` opens
one bidirectional ``GenerateStream`` with the router, on first use, and sends every request on
it, multiplexed by request id::

    generate() / stream() ──request entry──▶ Outbox ──writer──GenerateCalls──▶ router
    per-request Inbox ◀── reader (stamps arrival) ◀──GenerateEvents──────────── router

A request's life on the stream (by request id)::

    open (inbox, deadline timer) ─▶ request entry sent ─▶ chunks ─▶ last chunk or error ─▶ released
      └─ the caller leaves early (break, aclose, task cancelled) or its deadline passes:
         released, and a cancel entry aborts it on the router
      └─ the stream breaks: every open request fails with the stream's status (UNAVAILABLE when
         the router went away); the next request opens a new stream
      └─ the router has no GenerateStream (UNIMPLEMENTED: an older router): the request is
         not served here (:class:`NotServed`); the client goes back to one call per request

Each chunk's arrival time is read when its message is read off the stream, so chunks that
arrive in one message share it. Errors are the ones a ``Generate`` call would give
(``errors.from_status``). Owns no request building (``_request.py``) or timing (``types.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable

import grpc
import grpc.aio

from distserve._proto import generation_pb2, generation_pb2_grpc
from distserve.client.errors import DistserveError, InvalidRequest, from_status
from distserve.rpc.multiplex import STATUS_CODES, ClientStream, Inbox, Outbox

logger = logging.getLogger(__name__)

_STATUS_WAIT_S = 1.0  # how long a failed write waits for the call's status to be read

# Caps on one GenerateCalls message, well under the 4 MiB a gRPC server accepts by default.
MAX_CALLS_PER_MESSAGE = 256
MAX_BYTES_PER_MESSAGE = 1 << 20
# A request estimated larger than this is sent as its own Generate call: a stream message over
# the router's receive limit would end the stream, and every request on it with it.
MAX_STREAMED_REQUEST_BYTES = 3 << 20


class NotServed(Exception):
    """The stream failed before the router answered anything on it: the request is sent again
    as its own call. ``unimplemented``: the router said it has no ``GenerateStream`` (an older
    router), so the client stops trying the stream. grpc's core sometimes reports that refusal
    as INTERNAL instead (the request's first write races the router's answer); such a stream's
    requests are sent again too, and the next request tries a stream once more."""

    def __init__(self, details: str, unimplemented: bool) -> None:
        super().__init__(details)
        self.unimplemented = unimplemented


def request_size(request: generation_pb2.GenerateRequest) -> int:
    """An upper estimate of the request's encoded bytes (4 per character, 5 per token id)."""
    return 256 + 4 * len(request.text) + 5 * len(request.token_ids.ids) + 4 * len(request.client_id)


def fresh_request_id() -> str:
    """A request id no other client will pick (the router keys its instance sessions by it)."""
    return f"req-{uuid.uuid4().hex[:16]}"


class MultiplexedStream(ClientStream[generation_pb2.GenerateCalls]):
    """One open ``GenerateStream`` and the requests on it; dead once it broke or was closed.
    A request's inbox gets (arrival_s, event) pairs."""

    def __init__(self, stub: generation_pb2_grpc.GenerationStub, endpoint: str) -> None:
        self.endpoint = endpoint
        self.has_answered = False  # some message came back on this stream
        outbox: Outbox[generation_pb2.GenerateCalls] = Outbox(
            generation_pb2.GenerateCalls,
            "calls",
            max_entries=MAX_CALLS_PER_MESSAGE,
            max_size=MAX_BYTES_PER_MESSAGE,
        )
        super().__init__(stub.GenerateStream(), outbox)

    # ---- requests ------------------------------------------------------------------------
    def open(
        self, request: generation_pb2.GenerateRequest, size: int, timeout_s: float | None
    ) -> Inbox:
        """Send ``request`` (its request_id set) and return the inbox of its events."""
        rid = request.request_id
        if rid in self.inboxes:
            raise InvalidRequest(
                f"request {rid} is already in flight on this client", code="INVALID_ARGUMENT"
            )
        deadline_error = functools.partial(
            from_status, grpc.StatusCode.DEADLINE_EXCEEDED, "", self.endpoint, timeout_s
        )
        return self._open(rid, size, timeout_s, deadline_error, request=request)

    def release(self, rid: str, cancel: bool) -> None:
        """The caller is done with ``rid``; ``cancel``: the router may still be running it."""
        self._release(rid, cancel, len(rid), cancel=rid)

    # ---- the stream ----------------------------------------------------------------------
    async def _write(self) -> None:
        try:
            await self._send()
        except grpc.aio.AioRpcError as exc:
            # The call is over. Its status comes with the reader's next read: the write's own
            # error can be a transport-level INTERNAL that hides the router's answer (e.g.
            # UNIMPLEMENTED from an older router, which must fall back to per-call requests).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.reader), _STATUS_WAIT_S)
            self.fail(exc.code(), exc.details() or "")  # no-op once the reader has failed it
        except Exception as exc:  # the call is over (InvalidStateError): the reader reports why
            logger.debug("GenerateStream write failed: %r", exc)

    async def _read(self) -> None:
        code, details = grpc.StatusCode.UNAVAILABLE, "the router ended the stream"
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    break
                arrival_s = time.perf_counter()
                self.has_answered = True
                for event in message.events:
                    inbox = self.inboxes.get(event.request_id)
                    if inbox is not None:  # else: released already (cancelled, timed out)
                        inbox.put((arrival_s, event))
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, "the client was closed"
            raise
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        except Exception as exc:
            details = f"{type(exc).__name__}: {exc}"
        finally:
            self.fail(code, details)

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        """End the stream: every open request fails with ``code``; the next opens a new one."""
        unimplemented = code == grpc.StatusCode.UNIMPLEMENTED
        error: Callable[[], BaseException]
        if unimplemented or (code == grpc.StatusCode.INTERNAL and not self.has_answered):
            error = functools.partial(NotServed, details, unimplemented)
        else:
            error = functools.partial(from_status, code, details, self.endpoint, None)
        if self._end(error) and code != grpc.StatusCode.CANCELLED:
            logger.info("GenerateStream to %s ended: %s: %s", self.endpoint, code.name, details)

    async def close(self) -> None:
        """Cancel the stream: what is in flight fails (CANCELLED) and is aborted on the router."""
        self.fail(grpc.StatusCode.CANCELLED, "the client was closed")
        await asyncio.gather(self.writer, self.reader, return_exceptions=True)


def event_error(
    event: generation_pb2.GenerateEvent, endpoint: str, timeout_s: float | None
) -> DistserveError:
    """The SDK error for a request's ``error`` event."""
    code = STATUS_CODES.get(event.error.code, grpc.StatusCode.UNKNOWN)
    return from_status(code, event.error.details, endpoint, timeout_s)
