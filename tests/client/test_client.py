"""The gRPC SDK against a real loopback server with canned token streams."""

from __future__ import annotations

import asyncio
import time

import pytest

from distserve.client import (
    AsyncClient,
    Client,
    InvalidRequest,
    RequestTimeout,
    ServerUnavailable,
)
from tests.client.fake_grpc import MODEL_NAME, free_port, serve_fake_generation


@pytest.fixture(scope="module")
def fake_server():
    with serve_fake_generation() as (address, servicer):
        yield address, servicer


def test_generate_returns_tokens_text_usage_and_timings(fake_server):
    address, servicer = fake_server
    with Client(address) as client:
        done = client.generate(
            "hello there", max_tokens=5, temperature=0.0, seed=7, stop=["zz"], client_id="alice"
        )
    assert done.token_ids == [100, 101, 102, 103, 104]
    assert done.text == "t0 t1 t2 t3 t4 "
    assert done.finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (2, 5)
    assert done.usage.cached_tokens == 1
    assert (done.prefill_instance, done.decode_instance) == ("p0", "d0")
    assert done.ttft_s is not None and 0 < done.ttft_s <= done.e2e_s
    assert done.tpot_s is not None and done.tpot_s > 0
    assert len(done.itl_s) == 4
    # TPOT is (last - first) / (n - 1): the mean of the gaps between tokens
    assert done.tpot_s == pytest.approx(sum(done.itl_s) / 4)
    sent = servicer.requests[-1]
    assert sent.client_id == "alice"
    assert sent.sampling.temperature == 0.0 and sent.sampling.seed == 7
    assert list(sent.sampling.stop) == ["zz"]
    assert not sent.sampling.HasField("top_p")  # unset options keep the server default


def test_token_id_prompt_is_sent_as_ids(fake_server):
    address, servicer = fake_server
    with Client(address) as client:
        done = client.generate([5, 6, 7], max_tokens=1)
    assert list(servicer.requests[-1].token_ids.ids) == [5, 6, 7]
    assert done.usage.prompt_tokens == 3
    assert done.tpot_s is None  # one output token: no TPOT


def test_stream_yields_chunks_in_order_with_arrival_times(fake_server):
    address, _ = fake_server
    with Client(address) as client:
        chunks = list(client.stream("hi", max_tokens=3))
    assert [c.token_ids for c in chunks] == [[100], [101], [102]]
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    arrivals = [c.arrival_s for c in chunks]
    assert arrivals == sorted(arrivals)
    assert all(c.elapsed_s > 0 for c in chunks)


def test_breaking_out_of_a_stream_cancels_the_call(fake_server):
    address, servicer = fake_server
    with Client(address) as client:  # the channel stays open: only the stream's close cancels
        for chunk in client.stream("hi", max_tokens=200, request_id="early-exit"):
            assert chunk.token_ids == [100]
            break
        deadline = time.monotonic() + 3
        while "early-exit" not in servicer.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "early-exit" in servicer.cancelled


def test_invalid_argument_becomes_invalid_request_with_server_message(fake_server):
    address, _ = fake_server
    with Client(address) as client, pytest.raises(InvalidRequest) as info:
        client.generate("invalid")
    assert "top_p must be in (0, 1]" in str(info.value)
    assert info.value.code == "INVALID_ARGUMENT"


def test_bad_local_values_are_refused_before_sending(fake_server):
    address, _ = fake_server
    with Client(address) as client:
        with pytest.raises(InvalidRequest, match=r"^max_tokens: "):
            client.generate("x", max_tokens=-1)
        with pytest.raises(InvalidRequest, match="prompt must be"):
            client.generate(3.5)  # type: ignore[arg-type]


def test_cluster_unavailable_names_the_endpoint(fake_server):
    address, _ = fake_server
    with Client(address) as client, pytest.raises(ServerUnavailable) as info:
        client.generate("busy")
    assert address in str(info.value) and "no decode instance" in str(info.value)


def test_unreachable_endpoint_fails_fast_with_server_unavailable():
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with Client(address, timeout_s=30) as client, pytest.raises(ServerUnavailable) as info:
        client.generate("hello")
    assert time.monotonic() - start < 5
    assert address in str(info.value)


def test_timeout_raises_request_timeout(fake_server):
    address, _ = fake_server
    with Client(address) as client, pytest.raises(RequestTimeout, match=r"0\.3 s"):
        client.generate("slow", max_tokens=5, timeout_s=0.3)


def test_model_info(fake_server):
    address, _ = fake_server
    with Client(f"grpc://{address}") as client:
        info = client.model_info()
    assert info.model_name == MODEL_NAME and info.max_model_len == 512


def test_async_client_generate_stream_and_errors(fake_server):
    address, servicer = fake_server

    async def main() -> None:
        async with AsyncClient(address) as client:
            done = await client.generate("a b c", max_tokens=4)
            assert done.text == "t0 t1 t2 t3 " and done.usage.prompt_tokens == 3
            assert done.ttft_s is not None and done.tpot_s is not None
            texts = [c.text async for c in client.stream("x", max_tokens=2)]
            assert texts == ["t0 ", "t1 "]
            with pytest.raises(InvalidRequest, match="top_p"):
                await client.generate("invalid")
            with pytest.raises(RequestTimeout):
                await client.generate("slow", timeout_s=0.3)
            assert (await client.model_info()).vocab_size == 300
            stream = client.stream("x", max_tokens=200, request_id="async-early")
            async for _ in stream:
                break
            await stream.aclose()
            deadline = time.monotonic() + 3
            while "async-early" not in servicer.cancelled and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert "async-early" in servicer.cancelled

    asyncio.run(main())


def test_async_client_unreachable_endpoint():
    async def main() -> None:
        async with AsyncClient(f"127.0.0.1:{free_port()}", timeout_s=30) as client:
            await client.generate("hello")

    start = time.monotonic()
    with pytest.raises(ServerUnavailable):
        asyncio.run(main())
    assert time.monotonic() - start < 5
