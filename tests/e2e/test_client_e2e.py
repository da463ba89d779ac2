"""The client SDK and ``distserve generate`` against a real cluster (1 prefill + 1 decode).

The SDK's tests run in both modes: one ``Generate`` call per request, and every request on one
multiplexed ``GenerateStream`` (``multiplex=True``).
"""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from distserve.client import AsyncClient, Client, InvalidRequest, RequestTimeout
from distserve.client.cli import add_generate_arguments, run_generate
from tests.e2e.conftest import NUM_KV_BLOCKS
from tests.e2e.test_cluster import _wait_all_blocks_free

pytestmark = pytest.mark.slow
MODES = pytest.mark.parametrize("multiplex", [True, False], ids=["multiplexed", "per-call"])


@MODES
def test_generate_equals_hugging_face_and_reports_timings(cluster, hf_reference, multiplex):
    ref = hf_reference(cluster.model_path)
    prompt = list(range(30, 70))
    with Client(cluster.grpc_address, multiplex=multiplex) as client:
        info = client.model_info()
        done = client.generate(
            prompt, max_tokens=12, temperature=0.0, ignore_eos=True, client_id="e2e"
        )
    expected, _ = ref.greedy(prompt, 12)
    assert done.token_ids == expected
    assert done.finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (40, 12)
    assert done.ttft_s is not None and 0 < done.ttft_s <= done.e2e_s
    assert done.tpot_s is not None and done.tpot_s > 0 and len(done.itl_s) >= 1
    assert done.prefill_instance and done.decode_instance
    assert info.model_name and info.vocab_size > 0 and info.max_model_len > 0
    assert (info.num_prefill_instances, info.num_decode_instances) == (1, 1)


@MODES
def test_stream_and_async_client_agree_with_generate(cluster, multiplex):
    options = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True}
    with Client(cluster.grpc_address, multiplex=multiplex) as client:
        done = client.generate("hello there", **options)
        chunks = list(client.stream("hello there", **options))
    assert [t for c in chunks for t in c.token_ids] == done.token_ids
    assert "".join(c.text for c in chunks) == done.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
    assert all(c.finish_reason is None for c in chunks[:-1])

    async def via_async() -> list[int]:
        async with AsyncClient(cluster.grpc_address, multiplex=multiplex) as client:
            return (await client.generate("hello there", **options)).token_ids

    assert asyncio.run(via_async()) == done.token_ids


@MODES
def test_errors_from_the_cluster(cluster, multiplex):
    with Client(cluster.grpc_address, multiplex=multiplex) as client:
        with pytest.raises(InvalidRequest, match="top_p"):
            client.generate("x", top_p=2.0)
        with pytest.raises(RequestTimeout):
            client.generate("x", max_tokens=200, ignore_eos=True, timeout_s=0.05)
        # the cluster still serves after both
        assert len(client.generate([1, 2, 3], max_tokens=2, temperature=0.0).token_ids) == 2


def test_generate_command(cluster, capsys):
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    argv = ["hello", "--endpoint", cluster.grpc_address, "--max-tokens", "4", "--temperature", "0"]
    assert run_generate(parser.parse_args([*argv, "--ignore-eos", "--json"])) == 0
    done = json.loads(capsys.readouterr().out)
    assert len(done["token_ids"]) == 4 and done["usage"]["completion_tokens"] == 4
    assert run_generate(parser.parse_args([*argv, "--stream"])) == 0
    assert capsys.readouterr().out.strip()
    assert (
        run_generate(parser.parse_args(["x", "--endpoint", cluster.grpc_address, "--top-p", "2"]))
        == 2
    )


def test_concurrent_requests_on_one_stream_equal_per_call_and_hugging_face(cluster, hf_reference):
    ref = hf_reference(cluster.model_path)
    prompts = [[(13 * i + k) % 400 + 10 for k in range(8 + 5 * i)] for i in range(10)]
    options = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}

    async def run(multiplex: bool) -> list[tuple]:
        async with AsyncClient(cluster.grpc_address, multiplex=multiplex) as client:

            async def one(prompt: list[int]) -> tuple:
                chunks = [c async for c in client.stream(prompt, **options)]
                assert all(c.finish_reason is None for c in chunks[:-1])
                last = chunks[-1]
                # an instance may put several steps' tokens in one chunk when its reader lags:
                # compare what the chunks add up to
                return (
                    [t for c in chunks for t in c.token_ids],
                    "".join(c.text for c in chunks),
                    last.finish_reason,
                    (last.usage.prompt_tokens, last.usage.completion_tokens),
                    (last.prefill_instance, last.decode_instance),
                )

            return await asyncio.gather(*(one(p) for p in prompts))

    per_call = asyncio.run(run(False))
    multiplexed = asyncio.run(run(True))
    assert multiplexed == per_call
    for prompt, (tokens, _, finish, usage, _) in zip(prompts, multiplexed, strict=True):
        assert tokens == ref.greedy(prompt, 8)[0]
        assert finish == "length" and usage == (len(prompt), 8)


def test_leaving_streams_early_and_closing_the_client_free_every_block(cluster):
    options = {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True}

    async def main() -> None:
        client = AsyncClient(cluster.grpc_address)
        for i in range(4):  # cancel entries: right after the first token, or mid-decode
            chunks = client.stream([50 + i] * (20 + 30 * i), **options)
            received = 0
            async for chunk in chunks:
                received += len(chunk.token_ids)
                if received >= (1 if i % 2 == 0 else 5 + i):
                    break
            await chunks.aclose()
        # requests still running when the client closes are aborted with its stream
        pending = [
            asyncio.ensure_future(client.generate([90 + i] * 40, **options)) for i in range(3)
        ]
        await asyncio.sleep(0.5)
        await client.close()
        await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run(main())
    seen = _wait_all_blocks_free(cluster.grpc_address)
    assert seen and all(free == total == NUM_KV_BLOCKS for free, total in seen.values()), seen
    with Client(cluster.grpc_address, multiplex=True) as client:  # the cluster still serves
        assert len(client.generate([7, 8, 9], max_tokens=3, temperature=0.0).token_ids) == 3
