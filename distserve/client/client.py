"""Blocking gRPC client of a distserve router.

    with Client("127.0.0.1:50051") as client:
        done = client.generate("Hello", max_tokens=16)          # whole completion + timings
        for chunk in client.stream("Hello", max_tokens=16):     # chunk by chunk
            print(chunk.text, end="", flush=True)

Owns one channel per client, and makes one ``Generate`` call per request. Every failure is
raised as a :mod:`distserve.client.errors` error; breaking out of :meth:`Client.stream` cancels
the call, which aborts the request on the router.

``Client(endpoint, multiplex=True)`` sends every request on one ``GenerateStream`` instead
(less CPU per request and per token on both sides; useful when many threads share a client): an
:class:`~distserve.client.AsyncClient` in its multiplexed mode runs on an event loop in a thread
of the client's own, and each call waits for it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from distserve._proto import generation_pb2, generation_pb2_grpc
from distserve.client._request import DEFAULT_ENDPOINT, build_request, normalize_endpoint
from distserve.client.async_client import AsyncClient
from distserve.client.errors import from_rpc_error
from distserve.client.types import (
    Completion,
    CompletionBuilder,
    ModelInfo,
    StreamChunk,
    model_info_from_proto,
)
from distserve.rpc.options import channel_options

T = TypeVar("T")


class Client:
    """Synchronous client; ``timeout_s`` is the default deadline of each request (None: none);
    ``multiplex``: all requests on one ``GenerateStream`` (see the module docstring)."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout_s: float | None = 600.0,
        *,
        multiplex: bool = False,
    ) -> None:
        self.endpoint = normalize_endpoint(endpoint)
        self.timeout_s = timeout_s
        # keepalive, gRPC's default message limits, no transparent retries (the caller decides)
        options = channel_options(max_message_bytes=None, retries=False)
        self._channel = grpc.insecure_channel(self.endpoint, options=options)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._loop: _LoopThread | None = None
        if multiplex:
            self._loop = _LoopThread()
            self._async = AsyncClient(self.endpoint, timeout_s, multiplex=True)

    def generate(
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
        if self._loop is not None:
            return self._loop.run(self._async.generate(**options))
        call = self._run(options)
        for _ in call:
            pass
        return call.completion

    def stream(
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
    ) -> Iterator[StreamChunk]:
        """Yield the request's chunks as they arrive; the last one has ``finish_reason`` set."""
        options = dict(locals())  # the keyword arguments above, forwarded unchanged
        del options["self"]
        if self._loop is None:
            yield from self._run(options)
            return
        loop, chunks = self._loop, self._async.stream(**options)
        try:
            while True:
                try:
                    chunk = loop.run(_awaited(chunks.__anext__()))
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            if loop is self._loop:  # (else the client was closed, and the request with it)
                loop.run(_awaited(chunks.aclose()))  # left early: the request is cancelled

    def model_info(self, timeout_s: float | None = None) -> ModelInfo:
        limit = timeout_s if timeout_s is not None else self.timeout_s
        try:
            msg = self._stub.GetModelInfo(generation_pb2.ModelInfoRequest(), timeout=limit)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.endpoint, limit) from None
        return model_info_from_proto(msg)

    def _run(self, options: dict[str, Any]) -> _Call:
        prompt = options.pop("prompt")
        timeout_s = options.pop("timeout_s")
        limit = timeout_s if timeout_s is not None else self.timeout_s
        request = build_request(prompt, **options)
        return _Call(self, request, limit)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run(self._async.close())
            self._loop.stop()
            self._loop = None
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Call:
    """One ``Generate`` call as an iterator of chunks; keeps the completion when done."""

    def __init__(
        self, client: Client, request: generation_pb2.GenerateRequest, limit: float | None
    ) -> None:
        self._client = client
        self._request = request
        self._limit = limit
        self._builder = CompletionBuilder(request.request_id)

    @property
    def completion(self) -> Completion:
        return self._builder.build()

    def __iter__(self) -> Iterator[StreamChunk]:
        self._builder = CompletionBuilder(self._request.request_id)
        call = self._client._stub.Generate(self._request, timeout=self._limit)
        try:
            for resp in call:
                yield self._builder.add(resp)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self._client.endpoint, self._limit) from None
        finally:
            call.cancel()  # no-op when finished; aborts the request when the caller stopped early


async def _awaited(awaitable: Awaitable[T]) -> T:
    """A coroutine of any awaitable (what ``run_coroutine_threadsafe`` takes)."""
    return await awaitable


class _LoopThread:
    """An asyncio event loop running in a daemon thread; :meth:`run` waits for a coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="distserve-client", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted (KeyboardInterrupt): stop the request too
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()
