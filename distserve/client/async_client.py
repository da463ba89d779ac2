"""Asyncio gRPC client of a distserve router (same calls as :class:`~distserve.client.Client`).

    async with AsyncClient("127.0.0.1:50051") as client:
        done = await client.generate("Hello", max_tokens=16)
        async for chunk in client.stream("Hello", max_tokens=16):
            ...

Owns one ``grpc.aio`` channel, bound to the event loop it is first used on. Closing
:meth:`AsyncClient.stream` early (``break``, ``aclose()``, task cancelled) cancels the call,
which aborts the request on the router.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio

from distserve._proto import generation_pb2, generation_pb2_grpc
from distserve.client._request import DEFAULT_ENDPOINT, build_request, normalize_endpoint
from distserve.client.errors import from_rpc_error
from distserve.client.types import (
    Completion,
    CompletionBuilder,
    ModelInfo,
    StreamChunk,
    model_info_from_proto,
)


class AsyncClient:
    """Asynchronous client; ``timeout_s`` is the default deadline of each call (None: none)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout_s: float | None = 600.0) -> None:
        self.endpoint = normalize_endpoint(endpoint)
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> generation_pb2_grpc.GenerationStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.endpoint, options=[("grpc.enable_retries", 0)]
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
    ) -> AsyncIterator[StreamChunk]:
        """Yield the request's chunks as they arrive; the last one has ``finish_reason`` set."""
        options = dict(locals())  # the keyword arguments above, forwarded unchanged
        del options["self"]
        request, limit = self._prepare(options)
        async for chunk in self._call(request, limit, CompletionBuilder(request.request_id)):
            yield chunk

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
    ) -> AsyncIterator[StreamChunk]:
        """The chunks of one call; ``builder`` was made just now, so its clock starts at send."""
        call = self._stub().Generate(request, timeout=limit)
        try:
            async for resp in call:
                yield builder.add(resp)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.endpoint, limit) from None
        finally:
            call.cancel()  # no-op when finished; aborts the request when the caller stopped early

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
