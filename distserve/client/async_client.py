"""Asyncio gRPC client of a distserve router (same calls as :class:`~distserve.client.Client`).

    async with AsyncClient("127.0.0.1:50051") as client:
        done = await client.generate("Hello", max_tokens=16)
        async for chunk in client.stream("Hello", max_tokens=16):
            ...

Owns one ``grpc.aio`` channel, bound to the event loop it is first used on. By default
(``multiplex=True``) every request travels on one ``GenerateStream`` opened on first use
(``_multiplex.py``): batched messages, far less CPU per request and per token on both sides
than a call per request; a router without ``GenerateStream`` is served one call per request.
``multiplex=False`` makes one ``Generate`` call per request. Both give the same chunks,
errors and timings. Closing :meth:`AsyncClient.stream` early (``break`` then ``aclose()``, or
the task cancelled) aborts the request on the router; :meth:`close` aborts what is in flight.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

import grpc
import grpc.aio

from distserve import timeline
from distserve._proto import generation_pb2, generation_pb2_grpc
from distserve.client._multiplex import (
    MAX_STREAMED_REQUEST_BYTES,
    MultiplexedStream,
    NotServed,
    event_error,
    fresh_request_id,
    request_size,
)
from distserve.client._request import DEFAULT_ENDPOINT, build_request, normalize_endpoint
from distserve.client.errors import from_rpc_error
from distserve.client.types import (
    Completion,
    CompletionBuilder,
    ModelInfo,
    StreamChunk,
    model_info_from_proto,
)
from distserve.rpc.options import channel_options


class AsyncClient:
    """Asynchronous client; ``timeout_s`` is the default deadline of each request (None: none);
    ``multiplex``: all requests on one ``GenerateStream`` (default) or one call each."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout_s: float | None = 600.0,
        *,
        multiplex: bool = True,
    ) -> None:
        self.endpoint = normalize_endpoint(endpoint)
        self.timeout_s = timeout_s
        self.multiplex = multiplex  # set to False when the router turns out not to serve it
        self._channel: grpc.aio.Channel | None = None
        self._stream: MultiplexedStream | None = None

    def _stub(self) -> generation_pb2_grpc.GenerationStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.endpoint, options=channel_options(max_message_bytes=None, retries=False)
            )
        return generation_pb2_grpc.GenerationStub(self._channel)

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        client_id: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> Completion:
        """Run one request to the end; returns its tokens, text, usage and timings."""
        options = dict(locals())  # the keyword arguments above, forwarded unchanged
        del options["self"]
        request, limit = self._prepare(options)
        builder = CompletionBuilder(request.request_id)
        async for _ in self._call(request, limit, builder):
            pass
        return builder.build()

    async def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        client_id: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> AsyncGenerator[StreamChunk, None]:
        """Yield the request's chunks as they arrive; the last one has ``finish_reason`` set."""
        options = dict(locals())  # the keyword arguments above, forwarded unchanged
        del options["self"]
        request, limit = self._prepare(options)
        chunks = self._call(request, limit, CompletionBuilder(request.request_id))
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # left early: abort the request now, not when collected

    async def model_info(self, timeout_s: float | None = None) -> ModelInfo:
        limit = timeout_s if timeout_s is not None else self.timeout_s
        try:
            msg = await self._stub().GetModelInfo(generation_pb2.ModelInfoRequest(), timeout=limit)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.endpoint, limit) from None
        return model_info_from_proto(msg)

    def _prepare(
        self, options: dict[str, Any]
    ) -> tuple[generation_pb2.GenerateRequest, float | None]:
        prompt = options.pop("prompt")
        timeout_s = options.pop("timeout_s")
        limit = timeout_s if timeout_s is not None else self.timeout_s
        return build_request(prompt, **options), limit

    async def _call(
        self,
        request: generation_pb2.GenerateRequest,
        limit: float | None,
        builder: CompletionBuilder,
    ) -> AsyncGenerator[StreamChunk, None]:
        """The chunks of one request; ``builder`` was made just now: its clock starts at send."""
        size = request_size(request)
        if self.multiplex and size <= MAX_STREAMED_REQUEST_BYTES:
            chunks = self._multiplexed(request, size, limit, builder)
            has_yielded = False
            try:
                async for chunk in chunks:
                    has_yielded = True
                    yield chunk
                return
            except NotServed as exc:
                if has_yielded:  # not reached: the stream had not answered anything
                    raise
                if exc.unimplemented:
                    self.multiplex = False  # an older router: one call per request from now on
            finally:
                await chunks.aclose()
        chunks = self._generate_call(request, limit, builder)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def _multiplexed(
        self,
        request: generation_pb2.GenerateRequest,
        size: int,
        limit: float | None,
        builder: CompletionBuilder,
    ) -> AsyncGenerator[StreamChunk, None]:
        """One request on the client's ``GenerateStream``; leaving early cancels it there."""
        if self._stream is None or self._stream.is_dead:
            self._stream = MultiplexedStream(self._stub(), self.endpoint)
        stream = self._stream
        if not request.request_id:
            request.request_id = fresh_request_id()
        rid = request.request_id
        timeline.mark(rid, "client.send")
        inbox = stream.open(request, size, limit)
        is_over = False  # the router sent the request's last event
        first = True
        try:
            while True:
                arrival_s, event = await inbox.get()
                if event.HasField("error"):
                    is_over = True
                    raise event_error(event, self.endpoint, limit)
                is_over = bool(event.chunk.finish_reason)
                if first:
                    timeline.mark(rid, "client.first", arrival_s)  # perf_counter is monotonic
                    first = False
                yield builder.add(event.chunk, arrival_s)
                if is_over:
                    return
        finally:
            stream.release(rid, cancel=not is_over)

    async def _generate_call(
        self,
        request: generation_pb2.GenerateRequest,
        limit: float | None,
        builder: CompletionBuilder,
    ) -> AsyncGenerator[StreamChunk, None]:
        """One request as its own ``Generate`` call."""
        call = self._stub().Generate(request, timeout=limit)
        try:
            async for resp in call:
                yield builder.add(resp)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.endpoint, limit) from None
        finally:
            call.cancel()  # no-op when finished; aborts the request when the caller stopped early

    async def close(self) -> None:
        """Close the channel; requests still in flight fail and are aborted on the router."""
        if self._stream is not None:
            await self._stream.close()
            self._stream = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
