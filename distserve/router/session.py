"""The router's session with one instance: one long-lived ``Session`` stream that carries every
Prefill, Decode and Generate the router sends that instance, and their answers back.

A gRPC call costs far more CPU than a message on a stream that is already open, and a message
can carry a batch; so instead of one call per request and phase, each (router, instance) pair
keeps one bidirectional stream, and each message carries every entry ready at the time::

    callers ──prefill / decode / generate──▶ Outbox ──writer task──SessionCalls──▶ instance
    callers ◀── per-request Inbox ◀── reader task ◀──SessionEvents──────────────── instance

``Outbox`` (batching entries into messages) and ``Inbox`` (a request's events and deadline) are
the client half's shared parts in ``rpc/multiplex.py``; the SDK's ``GenerateStream`` client
uses them too.

A request's life on a session (``_Stream``), by request id::

    open(inbox, deadline timer) ─▶ call entry sent ─▶ events ─▶ last event ─▶ released
       └─ caller leaves early (client gone, stop string, deadline): released + abort entry sent
       └─ stream breaks or is closed: every open request fails UNAVAILABLE

Failures look like the per-request RPCs' failures: :class:`SessionCallError` has ``code()``
and ``details()`` like ``grpc.aio.AioRpcError``. A stream that broke is dead; the next request
opens a new one. The session is opened lazily (on the first request) over the instance's
channel, and closed by the registry when the instance leaves and at router shutdown.

Owns no routing or retry logic (``core.py``), no instance state (``registry.py``) and no
batching or inbox machinery (``rpc/multiplex.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from distserve._proto import instance_pb2, instance_pb2_grpc
from distserve.rpc.multiplex import STATUS_CODES, ClientStream, Inbox, Outbox

logger = logging.getLogger(__name__)

# Caps on one SessionCalls message (prompt token ids are at most 5 bytes each on the wire).
MAX_CALLS_PER_MESSAGE = 256
MAX_TOKENS_PER_MESSAGE = 1 << 20


class SessionCallError(Exception):
    """A request on a session failed: the status its per-request RPC would have ended with.

    Read like ``grpc.aio.AioRpcError``: ``code()`` and ``details()``.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    @classmethod
    def from_proto(cls, error: instance_pb2.SessionError) -> SessionCallError:
        return cls(STATUS_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.details)


# What a request whose deadline passed fails with (put in its inbox by the deadline timer).
_DEADLINE_EXCEEDED = functools.partial(
    SessionCallError, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
)


class _Stream(ClientStream[instance_pb2.SessionCalls]):
    """One open ``Session`` call and the requests on it; dead once it broke or was closed."""

    def __init__(self, instance_id: str, stub: instance_pb2_grpc.InstanceStub) -> None:
        self.instance_id = instance_id
        # an entry's size: its prompt token ids
        outbox: Outbox[instance_pb2.SessionCalls] = Outbox(
            instance_pb2.SessionCalls,
            "calls",
            max_entries=MAX_CALLS_PER_MESSAGE,
            max_size=MAX_TOKENS_PER_MESSAGE,
        )
        super().__init__(stub.Session(), outbox)

    # ---- requests ------------------------------------------------------------------------
    def open(self, kind: str, rid: str, request: Any, timeout_s: float | None) -> Inbox:
        """Queue ``request`` as a ``prefill``, ``decode`` or ``generate`` entry for the next
        message, and return the inbox of its events."""
        if rid in self.inboxes:
            raise SessionCallError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {rid} is already in flight on {self.instance_id}",
            )
        prompt = request.request if kind == "decode" else request
        num_tokens = len(prompt.prompt_token_ids)
        return self._open(rid, num_tokens, timeout_s, _DEADLINE_EXCEEDED, **{kind: request})

    def release(self, rid: str, abort: bool) -> None:
        """The caller is done with ``rid``; ``abort``: the instance may still be running it."""
        self._release(rid, abort, 0, abort=rid)

    # ---- the stream ----------------------------------------------------------------------
    async def _write(self) -> None:
        try:
            await self._send()
        except Exception as exc:  # the call ended: AioRpcError, InvalidStateError
            self.fail(f"sending failed: {_describe(exc)}")

    async def _read(self) -> None:
        why = "the instance ended the session"
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    break
                for event in message.events:
                    inbox = self.inboxes.get(event.request_id)
                    if inbox is not None:  # else: released already (aborted, timed out)
                        inbox.put(event)
        except asyncio.CancelledError:
            why = "the session was cancelled"
            raise
        except Exception as exc:
            why = _describe(exc)
        finally:
            self.fail(why)

    def fail(self, why: str) -> None:
        """End the stream: every open request fails UNAVAILABLE; the next one opens a new one."""
        details = f"session with {self.instance_id} ended: {why}"
        if self._end(lambda: SessionCallError(grpc.StatusCode.UNAVAILABLE, details)):
            logger.info("session with %s ended: %s", self.instance_id, why)

    async def wait_closed(self) -> None:
        await asyncio.gather(self.writer, self.reader, return_exceptions=True)


class InstanceSession:
    """The router's requests to one instance, multiplexed on one ``Session`` stream."""

    def __init__(self, instance_id: str, channel: grpc.aio.Channel) -> None:
        self.instance_id = instance_id
        self._stub = instance_pb2_grpc.InstanceStub(channel)
        self._stream: _Stream | None = None
        self._closed_why: str | None = None
        self.num_streams_opened = 0  # streams opened so far (a broken one is replaced)

    def _current(self) -> _Stream:
        if self._closed_why is not None:
            raise SessionCallError(
                grpc.StatusCode.UNAVAILABLE, f"{self.instance_id}: {self._closed_why}"
            )
        if self._stream is None or self._stream.is_dead:
            try:
                self._stream = _Stream(self.instance_id, self._stub)
            except Exception as exc:  # the channel is closed: the instance is leaving
                raise SessionCallError(grpc.StatusCode.UNAVAILABLE, _describe(exc)) from None
            self.num_streams_opened += 1
        return self._stream

    @property
    def num_in_flight(self) -> int:
        """Requests open on the current stream."""
        return len(self._stream.inboxes) if self._stream and not self._stream.is_dead else 0

    async def prefill(
        self, request: instance_pb2.EngineRequest, timeout_s: float | None = None
    ) -> instance_pb2.PrefillResponse:
        """The instance's answer to a Prefill; raises :class:`SessionCallError`."""
        rid = request.request_id
        stream = self._current()
        inbox = stream.open("prefill", rid, request, timeout_s)
        answered = False
        try:
            event = await inbox.get()
            answered = True
            kind = event.WhichOneof("kind")
            if kind == "prefill":
                return event.prefill
            if kind == "error":
                raise SessionCallError.from_proto(event.error)
            raise SessionCallError(grpc.StatusCode.INTERNAL, f"a prefill answered by {kind!r}")
        finally:
            stream.release(rid, abort=not answered)

    def decode(
        self, request: instance_pb2.DecodeRequest, timeout_s: float | None = None
    ) -> AsyncIterator[instance_pb2.TokenChunk]:
        """The instance's Decode stream; leaving it before its last chunk aborts the request.
        Nothing is sent before the first ``__anext__``."""
        return self._chunks("decode", request.request.request_id, request, timeout_s)

    def generate(
        self, request: instance_pb2.EngineRequest, timeout_s: float | None = None
    ) -> AsyncIterator[instance_pb2.TokenChunk]:
        """The (colocated) instance's Generate stream; leaving it early aborts the request."""
        return self._chunks("generate", request.request_id, request, timeout_s)

    async def _chunks(
        self, kind: str, rid: str, request: Any, timeout_s: float | None
    ) -> AsyncIterator[instance_pb2.TokenChunk]:
        stream = self._current()
        inbox = stream.open(kind, rid, request, timeout_s)
        is_over = False  # the instance sent the request's last event
        try:
            while True:
                event = await inbox.get()
                which = event.WhichOneof("kind")
                if which == "tokens":
                    chunk = event.tokens
                    is_over = bool(chunk.finish_reason)
                    yield chunk
                    if is_over:
                        return
                    continue
                is_over = True
                if which == "error":
                    raise SessionCallError.from_proto(event.error)
                raise SessionCallError(grpc.StatusCode.INTERNAL, f"a stream answered by {which!r}")
        finally:
            stream.release(rid, abort=not is_over)

    async def close(self, why: str = "the session was closed") -> None:
        """Fail what is in flight (UNAVAILABLE) and refuse new requests."""
        self._closed_why = why
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.fail(why)
            await stream.wait_closed()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
