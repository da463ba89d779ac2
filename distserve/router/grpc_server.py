"""The router's public gRPC service: ``distserve.v1.Generation``.

Two ways in, one request path (:meth:`RouterCore.generate`):

- ``Generate``: one call per request, one message per chunk;
- ``GenerateStream``: many requests multiplexed on one bidirectional stream (the SDK's default),
  batched both ways (``distserve/rpc/generate_stream.py`` on the pump of ``rpc/multiplex.py``)::

      GenerateCalls ──▶ reader ─┬─ request entry ──▶ one task: RouterCore.generate ─┐
                                └─ cancel entry ───▶ that task cancelled            │ chunks
      GenerateEvents ◀── writer: every event ready at the time ◀────────────────────┘

Both relay the same generator per request (``_responses``), so they answer alike, chunk for
chunk: bad input is ``INVALID_ARGUMENT`` with the reason, a cluster that cannot serve is
``UNAVAILABLE`` (on the stream: that request's ``error`` event, with the same code and
details). A client that cancels a call, sends a cancel entry, or drops its stream aborts the
request(s) on the instances: the core's generator is closed, which sends the abort on the
router's session with the instance.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from distserve._proto import generation_pb2, generation_pb2_grpc
from distserve.protocol import sampling_from_proto
from distserve.router.core import RouterCore
from distserve.router.types import FrontChunk, FrontRequest, InvalidRequestError, ServiceError
from distserve.rpc.generate_stream import serve_generate_stream
from distserve.rpc.multiplex import CallError, stream_call


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, core: RouterCore, policy_name: str) -> None:
        self.core = core
        self.policy_name = policy_name

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        # a cancelled call closes the responses, which aborts the request
        async for msg in stream_call(self._responses(request), context):
            yield msg

    async def GenerateStream(
        self,
        request_iterator: AsyncIterator[generation_pb2.GenerateCalls],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[generation_pb2.GenerateEvents]:
        batches = serve_generate_stream(request_iterator, self._responses)
        try:
            async for events in batches:
                yield events
        finally:
            await batches.aclose()  # the client went away: abort its requests now

    async def _responses(
        self, request: generation_pb2.GenerateRequest
    ) -> AsyncGenerator[generation_pb2.GenerateResponse, None]:
        """The answer to ``request``, as ``Generate`` streams it; what ends it early is a
        :class:`CallError` with the call's status. Closing it early aborts the request."""
        try:
            front = _front_request(request)
        except ValueError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        chunks = self.core.generate(front)
        try:
            async for chunk in chunks:
                yield _response(chunk)
        except InvalidRequestError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except ServiceError as exc:
            raise CallError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def GetModelInfo(
        self, request: generation_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ModelInfo:
        registry = self.core.registry
        return generation_pb2.ModelInfo(
            model_name=self.core.model_name,
            vocab_size=self.core.vocab_size,
            max_model_len=self.core.max_model_len,
            num_prefill_instances=len(registry.by_role("prefill")),
            num_decode_instances=len(registry.by_role("decode")),
            num_colocated_instances=len(registry.by_role("colocated")),
            routing_policy=self.policy_name,
        )


def _front_request(request: generation_pb2.GenerateRequest) -> FrontRequest:
    """The core's view of a request; raises ``ValueError`` for bad sampling or no prompt."""
    params = sampling_from_proto(request.sampling)
    which = request.WhichOneof("prompt")
    if which is None:
        raise ValueError("prompt is required (text or token_ids)")
    return FrontRequest(
        sampling_params=params,
        prompt_text=request.text if which == "text" else None,
        prompt_token_ids=list(request.token_ids.ids) if which == "token_ids" else None,
        request_id=request.request_id,
        client_id=request.client_id,
    )


def _response(chunk: FrontChunk) -> generation_pb2.GenerateResponse:
    msg = generation_pb2.GenerateResponse(
        request_id=chunk.request_id,
        token_ids=chunk.token_ids,
        text=chunk.text,
        finish_reason=chunk.finish_reason or "",
        prefill_instance=chunk.prefill_instance,
        decode_instance=chunk.decode_instance,
    )
    if chunk.usage is not None:
        msg.usage.prompt_tokens = chunk.usage.prompt_tokens
        msg.usage.completion_tokens = chunk.usage.completion_tokens
        msg.usage.cached_tokens = chunk.usage.cached_tokens
    return msg
