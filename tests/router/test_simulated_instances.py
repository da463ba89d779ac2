"""The router serves requests through simulated instances exactly as through real ones.

One asyncio loop holds a real router (``RouterServer``: Generation + Registry over gRPC) and
simulated instances that register and heartbeat with it; requests go through the public
``Generation`` service. Every server is stopped at the end, also when an assertion fails.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from distserve._proto import generation_pb2, generation_pb2_grpc
from distserve.instance.simulated import SimulatedInstance, SimulatedOptions, cluster_options
from distserve.launch.cluster_config import cluster_config_from_dict
from distserve.router.server import RouterServer


async def _serve(
    model,
    policy: str,
    num_prefill: int,
    num_decode: int,
    num_colocated: int,
    body,
    **options,
):
    config = cluster_config_from_dict(
        {
            "model": str(model),
            "device": "cpu",
            "router": {"grpc_port": 0, "http_port": None, "policy": policy},
            # what the router's config says of the pools; the instances below are what runs
            "prefill": {"instances": num_prefill},
            "decode": {"instances": num_decode},
            "colocated": {"instances": num_colocated},
        }
    )
    router = RouterServer(config)
    await router.start()
    instances: list[SimulatedInstance] = []
    try:
        base = SimulatedOptions(
            instance_id="",
            role="prefill",
            model=str(model),
            router_address=router.grpc_address,
            block_size=4,
            num_kv_blocks=64,
            heartbeat_s=0.05,
            **options,
        )
        for options in cluster_options(base, num_prefill, num_decode, num_colocated):
            instances.append(SimulatedInstance(options))
            await instances[-1].start()
        async with grpc.aio.insecure_channel(router.grpc_address) as channel:
            await body(generation_pb2_grpc.GenerationStub(channel), router, instances)
    finally:
        for instance in instances:
            await instance.stop()
        await router.stop()


def _request(ids: list[int], max_tokens: int, rid: str = "") -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id=rid,
        token_ids=generation_pb2.TokenIds(ids=ids),
        sampling=generation_pb2.SamplingOptions(max_tokens=max_tokens, temperature=0),
    )


async def _generate(stub, request) -> list[generation_pb2.GenerateResponse]:
    return [msg async for msg in stub.Generate(request, timeout=10)]


def test_disaggregated_request_goes_through_prefill_and_decode(tiny_llama):
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13]

    async def body(stub, router, instances):
        msgs = await _generate(stub, _request(prompt, 4, "r1"))
        tokens = [t for m in msgs for t in m.token_ids]
        assert tokens == prompt[:4]  # simulated output: the prompt's tokens, repeated
        last = msgs[-1]
        assert last.finish_reason == "length"
        assert last.usage.prompt_tokens == 9 and last.usage.completion_tokens == 4
        assert last.prefill_instance.startswith("sim-prefill-")
        assert last.decode_instance.startswith("sim-decode-")
        prefill = next(i for i in instances if i.options.instance_id == last.prefill_instance)
        assert prefill._leases == {}  # the decode side pulled the KV, ending the lease

        # the same prompt again on the same prefill instance hits its simulated prefix cache
        await asyncio.sleep(0.2)  # a heartbeat carries the stored blocks to the router
        again = await _generate(stub, _request(prompt, 1, "r2"))
        assert again[-1].finish_reason == "length" and len(again) == 1
        assert again[-1].usage.cached_tokens == 8
        assert again[-1].prefill_instance == last.prefill_instance
        assert sum(i.num_requests for i in instances) == 3  # 2 prefills + 1 decode

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _generate(stub, _request([10**9], 2))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(_serve(tiny_llama, "cache_aware", 2, 1, 0, body))


def test_text_prompt_through_colocated_instance(tiny_llama):
    async def body(stub, router, instances):
        request = generation_pb2.GenerateRequest(
            text="hello there",
            sampling=generation_pb2.SamplingOptions(max_tokens=3, temperature=0),
        )
        msgs = await _generate(stub, request)
        assert sum(len(m.token_ids) for m in msgs) == 3
        assert msgs[-1].finish_reason == "length"
        assert msgs[-1].prefill_instance == msgs[-1].decode_instance == "sim-colocated-0"
        assert "".join(m.text for m in msgs)  # detokenized by the router

    asyncio.run(_serve(tiny_llama, "round_robin", 0, 0, 1, body))


def test_prefill_on_a_dead_instance_is_retried_on_another(tiny_llama):
    """An instance that died (before the router noticed its missing heartbeats) fails the
    requests sent to it UNAVAILABLE on its session; their prefills go to another instance."""

    async def body(stub, router, instances):
        dead = next(i for i in instances if i.options.instance_id == "sim-prefill-0")
        await dead.stop()
        assert "sim-prefill-0" in router.core.registry.instances  # not noticed yet
        prompts = [[5 + i, 6, 7, 8, 9] for i in range(6)]
        results = await asyncio.gather(
            *(_generate(stub, _request(p, 3, f"retry-{i}")) for i, p in enumerate(prompts))
        )
        for p, msgs in zip(prompts, results, strict=True):
            assert [t for m in msgs for t in m.token_ids] == p[:3]
            assert msgs[-1].prefill_instance == "sim-prefill-1"
        # round robin sent some of them to the dead instance first
        assert router.core.registry.instances["sim-prefill-0"].session.num_streams_opened >= 1

    asyncio.run(_serve(tiny_llama, "round_robin", 2, 1, 0, body))


def test_client_cancellation_aborts_the_request_on_the_instance(tiny_llama):
    async def body(stub, router, instances):
        decode = next(i for i in instances if i.options.role == "decode")
        call = stub.Generate(_request([5, 6, 7, 8, 9], 10_000, "cancelled"), timeout=10)
        received = 0
        async for msg in call:
            received += len(msg.token_ids)
            if received >= 3:
                break
        assert "cancelled" in decode._running
        call.cancel()
        for _ in range(500):
            if "cancelled" not in decode._running:
                break
            await asyncio.sleep(0.01)
        assert "cancelled" not in decode._running
        # other requests on the same sessions are served as before
        msgs = await _generate(stub, _request([9, 8, 7], 3, "after"))
        assert [t for m in msgs for t in m.token_ids] == [9, 8, 7]

    asyncio.run(_serve(tiny_llama, "round_robin", 1, 1, 0, body, decode_delay_s=0.02))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_router_codec_is_the_tokenizer(tiny_models, arch):
    """The router's fast tokenizer path (taken for the throughput target) changes no result."""
    from transformers import AutoTokenizer

    from distserve.router.core import _Codec

    tokenizer = AutoTokenizer.from_pretrained(tiny_models(arch))
    codec = _Codec(tokenizer)
    assert codec._backend is not None  # these tokenizers take the fast path
    texts = ["Hi there!", " two  spaces\n", "\u00e9\u00e8 \u4e2d\u6587 \U0001f600", "<|im_end|> x"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert codec.encode(text) == ids
        for skip in (False, True):
            for part in (ids, ids[1:], ids[:1]):
                assert codec.decode(part, skip) == tokenizer.decode(part, skip_special_tokens=skip)
