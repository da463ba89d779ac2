"""The router's public gRPC service: ``distserve.v1.Generation``.

Maps each ``Generate`` call onto :meth:`RouterCore.generate` and back: bad input is
``INVALID_ARGUMENT`` with the reason, a cluster that cannot serve is ``UNAVAILABLE``; a client
that cancels aborts its request on the instances.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from distserve._proto import generation_pb2, generation_pb2_grpc
from distserve.protocol import sampling_from_proto
from distserve.router.core import RouterCore
from distserve.router.types import FrontRequest, InvalidRequestError, ServiceError


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, core: RouterCore, policy_name: str) -> None:
        self.core = core
        self.policy_name = policy_name

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        which = request.WhichOneof("prompt")
        if which is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "prompt is required (text or token_ids)"
            )
        front = FrontRequest(
            sampling_params=params,
            prompt_text=request.text if which == "text" else None,
            prompt_token_ids=list(request.token_ids.ids) if which == "token_ids" else None,
            request_id=request.request_id,
            client_id=request.client_id,
        )
        stream = self.core.generate(front)
        try:
            async for chunk in stream:
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
                yield msg
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ServiceError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            await stream.aclose()

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
