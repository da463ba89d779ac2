"""A small real gRPC ``Generation`` server on loopback with canned token streams (test helper).

Prompt text picks the behaviour: ``"invalid"`` → INVALID_ARGUMENT, ``"busy"`` → UNAVAILABLE,
``"slow"`` → each chunk 0.5 s apart; otherwise ``max_tokens`` (default 4) tokens ``100 + i`` with
text ``"t{i} "`` are streamed one per chunk, the last with finish ``"length"`` and usage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc

from distserve._proto import generation_pb2, generation_pb2_grpc

MODEL_NAME = "fake-model"
VOCAB_SIZE = 300


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    def __init__(self) -> None:
        self.requests: list[generation_pb2.GenerateRequest] = []
        self.cancelled: list[str] = []
        self.lock = threading.Lock()

    def Generate(self, request, context):
        with self.lock:
            self.requests.append(request)
        rid = request.request_id or f"req-{len(self.requests)}"
        prompt = request.text if request.HasField("text") else ""
        num_prompt = len(prompt.split()) if prompt else len(request.token_ids.ids)
        if prompt == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1], got 2.0")
        if prompt == "busy":
            context.abort(grpc.StatusCode.UNAVAILABLE, "no decode instance is alive")
        delay_s = 0.5 if prompt == "slow" else 0.002
        finished = threading.Event()

        def on_termination() -> None:  # runs when the RPC ends, however it ends
            if not finished.is_set():
                with self.lock:
                    self.cancelled.append(rid)

        context.add_callback(on_termination)
        sampling = request.sampling
        num_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else 4
        for i in range(num_tokens):
            time.sleep(delay_s)
            if not context.is_active():
                return
            last = i == num_tokens - 1
            resp = generation_pb2.GenerateResponse(
                request_id=rid, token_ids=[100 + i], text=f"t{i} ", prefill_instance="p0"
            )
            if last:
                resp.finish_reason = "length"
                resp.decode_instance = "d0"
                resp.usage.CopyFrom(
                    generation_pb2.Usage(
                        prompt_tokens=num_prompt, completion_tokens=num_tokens, cached_tokens=1
                    )
                )
                finished.set()
            yield resp

    def GetModelInfo(self, request, context):
        return generation_pb2.ModelInfo(
            model_name=MODEL_NAME,
            vocab_size=VOCAB_SIZE,
            max_model_len=512,
            num_prefill_instances=1,
            num_decode_instances=1,
            routing_policy="round_robin",
        )


@contextmanager
def serve_fake_generation() -> Iterator[tuple[str, FakeGeneration]]:
    """Yield ``(address, servicer)`` of a fake server running on a free loopback port."""
    servicer = FakeGeneration()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def free_port() -> int:
    """A loopback port that was free a moment ago (for 'nobody listens here' tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
