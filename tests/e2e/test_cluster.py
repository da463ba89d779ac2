"""The disaggregated cluster, end to end: outputs equal Hugging Face; cancellation frees blocks."""

from __future__ import annotations

import concurrent.futures
import random
import time

import grpc
import pytest

from distserve._proto import generation_pb2, generation_pb2_grpc
from tests.e2e.conftest import NUM_KV_BLOCKS, instance_stats, list_instances

pytestmark = pytest.mark.slow

NEW_TOKENS = 24


def _generate(address: str, prompt: list[int], max_tokens: int = NEW_TOKENS, **sampling):
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=prompt),
            sampling=generation_pb2.SamplingOptions(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling
            ),
        )
        tokens, last = [], None
        for chunk in stub.Generate(request, timeout=120):
            tokens.extend(chunk.token_ids)
            last = chunk
        return tokens, last


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(rng.randrange(1, 160))] for _ in range(n)]


def _wait_all_blocks_free(
    router_address: str, timeout_s: float = 30.0
) -> dict[str, tuple[int, int]]:
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {}
        for info in list_instances(router_address):
            stats = instance_stats(info.descriptor.address)
            seen[info.descriptor.instance_id] = (stats.num_free_blocks, stats.num_total_blocks)
        if all(free == total for free, total in seen.values()) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def test_16_concurrent_requests_equal_hf_with_prefill_tp2_decode_tp1(cluster, hf_reference):
    ref = hf_reference(cluster.model_path)
    prompts = _prompts(16, ref.model.config.vocab_size, seed=0)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: _generate(cluster.grpc_address, p), prompts))
    for prompt, (tokens, last) in zip(prompts, results):
        expected, _ = ref.greedy(prompt, NEW_TOKENS)
        assert tokens == expected, f"prompt of {len(prompt)} tokens diverged"
        assert last.finish_reason == "length"
        assert (
            last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == NEW_TOKENS
        )
        assert last.prefill_instance == "prefill-0" and last.decode_instance == "decode-0"
    roles = {
        i.descriptor.instance_id: len(i.descriptor.global_ranks)
        for i in list_instances(cluster.grpc_address)
    }
    assert roles == {"prefill-0": 2, "decode-0": 1}  # prefill TP=2 -> decode TP=1


def test_text_prompt_stop_string_and_prefix_reuse(cluster):
    _generate(cluster.grpc_address, list(range(20, 84)), max_tokens=8)
    _, last2 = _generate(cluster.grpc_address, list(range(20, 84)) + [99], max_tokens=8)
    assert last2.usage.cached_tokens == 64  # 8 full blocks of 8 tokens reused on the prefill side
    with grpc.insecure_channel(cluster.grpc_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        text = "".join(
            c.text
            for c in stub.Generate(
                generation_pb2.GenerateRequest(
                    text="hello there",
                    sampling=generation_pb2.SamplingOptions(
                        max_tokens=16, temperature=0.0, ignore_eos=True
                    ),
                ),
                timeout=60,
            )
        )
        assert len(text) > 3
        stop = text[2:4]
        chunks = list(
            stub.Generate(
                generation_pb2.GenerateRequest(
                    text="hello there",
                    sampling=generation_pb2.SamplingOptions(
                        max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop]
                    ),
                ),
                timeout=60,
            )
        )
        assert chunks[-1].finish_reason == "stop"
        assert "".join(c.text for c in chunks) == text[: text.find(stop)]


def test_bad_requests_are_invalid_argument_and_lose_nothing(cluster):
    with grpc.insecure_channel(cluster.grpc_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        cases = [
            (generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[])), "empty"),
            (
                generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[10**6])),
                "vocabulary",
            ),
            (
                generation_pb2.GenerateRequest(
                    text="x", sampling=generation_pb2.SamplingOptions(top_p=2.0)
                ),
                "top_p",
            ),
            (generation_pb2.GenerateRequest(), "prompt"),
            (
                generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[5] * 5000)),
                "context",
            ),
        ]
        for request, needle in cases:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request, timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert needle in info.value.details()
    tokens, _ = _generate(cluster.grpc_address, [1, 2, 3])
    assert len(tokens) == NEW_TOKENS


def test_cancel_mid_decode_and_mid_transfer_frees_every_block(cluster):
    rng = random.Random(1)
    with grpc.insecure_channel(cluster.grpc_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for i in range(8):
            prompt = [rng.randrange(10, 400) for _ in range(rng.randrange(20, 200))]
            call = stub.Generate(
                generation_pb2.GenerateRequest(
                    token_ids=generation_pb2.TokenIds(ids=prompt),
                    sampling=generation_pb2.SamplingOptions(
                        max_tokens=400, temperature=0.0, ignore_eos=True
                    ),
                ),
                timeout=60,
            )
            received = 0
            for chunk in call:
                received += len(chunk.token_ids)
                # i even: right after the first token (the KV pull is starting); odd: mid-decode.
                if received >= (1 if i % 2 == 0 else 5 + i):
                    break
            call.cancel()
    seen = _wait_all_blocks_free(cluster.grpc_address)
    assert seen and all(free == total == NUM_KV_BLOCKS for free, total in seen.values()), seen
    tokens, _ = _generate(cluster.grpc_address, [7, 8, 9])  # the cluster still serves
    assert len(tokens) == NEW_TOKENS


def test_every_instance_serves_prometheus_metrics_that_move(cluster):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    _generate(cluster.grpc_address, list(range(30, 90)))

    def samples(url: str) -> dict[tuple[str, tuple], float]:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    by_id = {i.descriptor.instance_id: i.descriptor.metrics_url for i in list_instances(cluster.grpc_address)}
    prefill, decode = samples(by_id["prefill-0"]), samples(by_id["decode-0"])
    assert prefill[("distserve_kv_transfer_bytes_total", (("direction", "send"),))] > 0
    assert decode[("distserve_kv_transfer_bytes_total", (("direction", "recv"),))] > 0
    assert any(name == "vllm:kv_cache_usage_perc" for name, _ in decode)
    router = samples(f"{cluster.http_url}/metrics")
    assert router[("distserve_kv_transfer_bytes_total", ())] > 0


def test_router_serves_health_and_reflection(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cluster.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
        names = {s.name for s in response.list_services_response.service}
    assert {"distserve.v1.Generation", "grpc.health.v1.Health"} <= names
