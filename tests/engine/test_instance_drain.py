"""An instance that is shutting down refuses new requests on an open Session stream.

During the gRPC server's grace period the router's Session stream stays open; without the
drain flag a request arriving then would be admitted and cut off when the server stops. It must
get UNAVAILABLE at once (the router retries a prefill elsewhere), while the request already
running finishes.
"""

from __future__ import annotations

import asyncio

import grpc

from distserve import SamplingParams
from distserve._proto import instance_pb2, instance_pb2_grpc
from distserve.config import CacheConfig, EngineConfig
from distserve.engine.llm_engine import LLMEngine
from distserve.instance.server import InstanceOptions, InstanceRuntime
from distserve.protocol import sampling_to_proto


def _generate(rid: str, max_tokens: int) -> instance_pb2.SessionCalls:
    request = instance_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=list(range(1, 9)),
        sampling=sampling_to_proto(SamplingParams(max_tokens=max_tokens, ignore_eos=True)),
    )
    return instance_pb2.SessionCalls(calls=[instance_pb2.SessionCall(generate=request)])


async def _drain(tiny_llama) -> dict[str, list[instance_pb2.SessionEvent]]:
    config = EngineConfig(model=str(tiny_llama), cache=CacheConfig(block_size=4, num_blocks=64))
    rt = InstanceRuntime(
        LLMEngine(config), InstanceOptions("c0", "colocated", (0,), router_address=None)
    )
    address = await rt.start()
    events: dict[str, list[instance_pb2.SessionEvent]] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        call = instance_pb2_grpc.InstanceStub(channel).Session()
        await call.write(_generate("before", 64))
        first = await call.read()  # "before" is running
        for e in first.events:
            events.setdefault(e.request_id, []).append(e)
        stopping = asyncio.create_task(rt.stop())
        await asyncio.sleep(0)  # stop() has begun: the server is in its grace period
        await call.write(_generate("during", 4))
        await call.done_writing()
        while (message := await call.read()) is not grpc.aio.EOF:
            for e in message.events:
                events.setdefault(e.request_id, []).append(e)
        await stopping
    return events


def test_a_draining_instance_refuses_new_session_requests_and_finishes_running_ones(tiny_llama):
    events = asyncio.run(_drain(tiny_llama))
    (refused,) = events["during"]
    assert refused.WhichOneof("kind") == "error"
    assert refused.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "shutting down" in refused.error.details
    tokens = [
        t for e in events["before"] if e.WhichOneof("kind") == "tokens" for t in e.tokens.token_ids
    ]
    assert len(tokens) == 64  # the request admitted before the stop ran to its end
    assert events["before"][-1].tokens.finish_reason == "length"
