"""A small real gRPC ``Generation`` server on loopback with canned token streams (test helper).

It serves ``Generate`` (one call per request) and ``GenerateStream`` (requests multiplexed on
one stream, served as the router serves it, ``distserve/rpc/generate_stream.py``), with the same
answers: prompt text picks the behaviour: ``"invalid"`` → INVALID_ARGUMENT, ``"busy"`` →
UNAVAILABLE, ``"slow"`` → each chunk 0.5 s apart; otherwise ``max_tokens`` (default 4) tokens
``100 + i`` with text ``"t{i} "`` are streamed one per chunk, the last with finish ``"length"``
and usage. ``cancelled`` lists the requests that ended before their last chunk (a cancelled
call, a cancel entry, a stream gone). ``serve_fake_generation(serves_stream=False)`` leaves
``GenerateStream`` out, as a router that predates it does (the call ends UNIMPLEMENTED).

The server runs on an asyncio loop in a thread of its own, so tests of the blocking and the
asyncio clients alike can talk to it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import grpc

from distserve._proto import generation_pb2, generation_pb2_grpc
from distserve.rpc.generate_stream import serve_generate_stream
from distserve.rpc.multiplex import CallError

MODEL_NAME = "fake-model"
VOCAB_SIZE = 300


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    def __init__(self) -> None:
        self.requests: list[generation_pb2.GenerateRequest] = []
        self.cancelled: list[str] = []
        self.num_generate_calls = 0
        self.num_stream_calls = 0

    async def _chunks(
        self, request: generation_pb2.GenerateRequest
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        self.requests.append(request)
        rid = request.request_id or f"req-{len(self.requests)}"
        prompt = request.text if request.HasField("text") else ""
        num_prompt = len(prompt.split()) if prompt else len(request.token_ids.ids)
        if prompt == "invalid":
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1], got 2.0")
        if prompt == "busy":
            raise CallError(grpc.StatusCode.UNAVAILABLE, "no decode instance is alive")
        delay_s = 0.5 if prompt == "slow" else 0.002
        sampling = request.sampling
        num_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else 4
        is_finished = False
        try:
            for i in range(num_tokens):
                await asyncio.sleep(delay_s)
                resp = generation_pb2.GenerateResponse(
                    request_id=rid, token_ids=[100 + i], text=f"t{i} ", prefill_instance="p0"
                )
                if i == num_tokens - 1:
                    resp.finish_reason = "length"
                    resp.decode_instance = "d0"
                    resp.usage.CopyFrom(
                        generation_pb2.Usage(
                            prompt_tokens=num_prompt, completion_tokens=num_tokens, cached_tokens=1
                        )
                    )
                    is_finished = True
                yield resp
        finally:
            if not is_finished:
                self.cancelled.append(rid)

    async def Generate(self, request, context):
        self.num_generate_calls += 1
        chunks = self._chunks(request)
        try:
            async for resp in chunks:
                yield resp
        except CallError as exc:
            await context.abort(exc.code, exc.details)
        finally:
            await chunks.aclose()

    async def GenerateStream(self, request_iterator, context):
        self.num_stream_calls += 1
        batches = serve_generate_stream(request_iterator, self._chunks)
        try:
            async for events in batches:
                yield events
        finally:
            await batches.aclose()

    async def GetModelInfo(self, request, context):
        return generation_pb2.ModelInfo(
            model_name=MODEL_NAME,
            vocab_size=VOCAB_SIZE,
            max_model_len=512,
            num_prefill_instances=1,
            num_decode_instances=1,
            routing_policy="round_robin",
        )


@contextmanager
def serve_fake_generation(serves_stream: bool = True) -> Iterator[tuple[str, FakeGeneration]]:
    """Yield ``(address, servicer)`` of a fake server running on a free loopback port."""
    servicer = FakeGeneration()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-router", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        if serves_stream:
            generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
        else:
            server.add_generic_rpc_handlers((_without_generate_stream(servicer),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    try:
        server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        try:
            yield f"127.0.0.1:{port}", servicer
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _without_generate_stream(servicer: FakeGeneration) -> grpc.GenericRpcHandler:
    """The Generation service of a router from before GenerateStream."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=generation_pb2.GenerateRequest.FromString,
            response_serializer=generation_pb2.GenerateResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=generation_pb2.ModelInfoRequest.FromString,
            response_serializer=generation_pb2.ModelInfo.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler("distserve.v1.Generation", handlers)


def free_port() -> int:
    """A loopback port that was free a moment ago (for 'nobody listens here' tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
