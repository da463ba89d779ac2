"""The client SDK and ``distserve generate`` against a real cluster (1 prefill + 1 decode)."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from distserve.client import AsyncClient, Client, InvalidRequest, RequestTimeout
from distserve.client.cli import add_generate_arguments, run_generate

pytestmark = pytest.mark.slow


def test_generate_equals_hugging_face_and_reports_timings(cluster, hf_reference):
    ref = hf_reference(cluster.model_path)
    prompt = list(range(30, 70))
    with Client(cluster.grpc_address) as client:
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


def test_stream_and_async_client_agree_with_generate(cluster):
    options = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True}
    with Client(cluster.grpc_address) as client:
        done = client.generate("hello there", **options)
        chunks = list(client.stream("hello there", **options))
    assert [t for c in chunks for t in c.token_ids] == done.token_ids
    assert "".join(c.text for c in chunks) == done.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
    assert all(c.finish_reason is None for c in chunks[:-1])

    async def via_async() -> list[int]:
        async with AsyncClient(cluster.grpc_address) as client:
            return (await client.generate("hello there", **options)).token_ids

    assert asyncio.run(via_async()) == done.token_ids


def test_errors_from_the_cluster(cluster):
    with Client(cluster.grpc_address) as client:
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
