"""The gRPC SDK against a real loopback server with canned token streams.

Every client test runs in both modes: one ``Generate`` call per request, and all requests
multiplexed on one ``GenerateStream`` (``multiplex=True``, the AsyncClient's default).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from distserve.client import (
    AsyncClient,
    Client,
    DistserveError,
    InvalidRequest,
    RequestTimeout,
    ServerUnavailable,
)
from tests.client.fake_grpc import MODEL_NAME, free_port, serve_fake_generation


@pytest.fixture(scope="module")
def fake_server():
    with serve_fake_generation() as (address, servicer):
        yield address, servicer


@pytest.fixture(params=[True, False], ids=["multiplexed", "per-call"])
def multiplex(request) -> bool:
    return request.param


async def wait_cancelled(servicer, rids: list[str], timeout_s: float = 3.0) -> None:
    """Wait (without blocking the client's event loop) until the server saw ``rids`` end early."""
    deadline = time.monotonic() + timeout_s
    while not all(rid in servicer.cancelled for rid in rids) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert all(rid in servicer.cancelled for rid in rids), servicer.cancelled


def test_generate_returns_tokens_text_usage_and_timings(fake_server, multiplex):
    address, servicer = fake_server
    with Client(address, multiplex=multiplex) as client:
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


def test_token_id_prompt_is_sent_as_ids(fake_server, multiplex):
    address, servicer = fake_server
    with Client(address, multiplex=multiplex) as client:
        done = client.generate([5, 6, 7], max_tokens=1)
    assert list(servicer.requests[-1].token_ids.ids) == [5, 6, 7]
    assert done.usage.prompt_tokens == 3
    assert done.tpot_s is None  # one output token: no TPOT


def test_stream_yields_chunks_in_order_with_arrival_times(fake_server, multiplex):
    address, _ = fake_server
    with Client(address, multiplex=multiplex) as client:
        chunks = list(client.stream("hi", max_tokens=3))
    assert [c.token_ids for c in chunks] == [[100], [101], [102]]
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    arrivals = [c.arrival_s for c in chunks]
    assert arrivals == sorted(arrivals)
    assert all(c.elapsed_s > 0 for c in chunks)


def test_breaking_out_of_a_stream_cancels_the_call(fake_server, multiplex):
    address, servicer = fake_server
    with Client(
        address, multiplex=multiplex
    ) as client:  # the channel stays open: only the stream's close cancels
        for chunk in client.stream("hi", max_tokens=200, request_id="early-exit"):
            assert chunk.token_ids == [100]
            break
        deadline = time.monotonic() + 3
        while "early-exit" not in servicer.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "early-exit" in servicer.cancelled


def test_invalid_argument_becomes_invalid_request_with_server_message(fake_server, multiplex):
    address, _ = fake_server
    with Client(address, multiplex=multiplex) as client, pytest.raises(InvalidRequest) as info:
        client.generate("invalid")
    assert "top_p must be in (0, 1]" in str(info.value)
    assert info.value.code == "INVALID_ARGUMENT"


def test_bad_local_values_are_refused_before_sending(fake_server, multiplex):
    address, _ = fake_server
    with Client(address, multiplex=multiplex) as client:
        with pytest.raises(InvalidRequest, match=r"^max_tokens: "):
            client.generate("x", max_tokens=-1)
        with pytest.raises(InvalidRequest, match="prompt must be"):
            client.generate(3.5)  # type: ignore[arg-type]


def test_cluster_unavailable_names_the_endpoint(fake_server, multiplex):
    address, _ = fake_server
    with Client(address, multiplex=multiplex) as client, pytest.raises(ServerUnavailable) as info:
        client.generate("busy")
    assert address in str(info.value) and "no decode instance" in str(info.value)


def test_unreachable_endpoint_fails_fast_with_server_unavailable(multiplex):
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with (
        Client(address, timeout_s=30, multiplex=multiplex) as client,
        pytest.raises(ServerUnavailable) as info,
    ):
        client.generate("hello")
    assert time.monotonic() - start < 5
    assert address in str(info.value)


def test_timeout_raises_request_timeout(fake_server, multiplex):
    address, _ = fake_server
    with (
        Client(address, multiplex=multiplex) as client,
        pytest.raises(RequestTimeout, match=r"0\.3 s"),
    ):
        client.generate("slow", max_tokens=5, timeout_s=0.3)


def test_model_info(fake_server, multiplex):
    address, _ = fake_server
    with Client(f"grpc://{address}", multiplex=multiplex) as client:
        info = client.model_info()
    assert info.model_name == MODEL_NAME and info.max_model_len == 512


def test_async_client_generate_stream_and_errors(fake_server, multiplex):
    address, servicer = fake_server

    async def main() -> None:
        async with AsyncClient(address, multiplex=multiplex) as client:
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
            await wait_cancelled(servicer, ["async-early"])

    asyncio.run(main())


def test_async_client_unreachable_endpoint(multiplex):
    async def main() -> None:
        async with AsyncClient(
            f"127.0.0.1:{free_port()}", timeout_s=30, multiplex=multiplex
        ) as client:
            await client.generate("hello")

    start = time.monotonic()
    with pytest.raises(ServerUnavailable):
        asyncio.run(main())
    assert time.monotonic() - start < 5


# ---- the multiplexed mode ------------------------------------------------------------------
def test_concurrent_requests_share_one_stream_and_equal_per_call_answers(fake_server):
    address, servicer = fake_server

    async def run(multiplex: bool) -> list[list[tuple]]:
        async with AsyncClient(address, multiplex=multiplex) as client:

            async def one(i: int) -> list[tuple]:
                chunks = client.stream([i + 1] * (1 + i % 3), max_tokens=1 + i % 5)
                return [
                    (c.token_ids, c.text, c.finish_reason, c.usage, c.decode_instance)
                    async for c in chunks
                ]

            return await asyncio.gather(*(one(i) for i in range(40)))

    streams_before, calls_before = servicer.num_stream_calls, servicer.num_generate_calls
    multiplexed = asyncio.run(run(True))
    assert servicer.num_stream_calls == streams_before + 1  # all 40 on one stream
    assert servicer.num_generate_calls == calls_before
    per_call = asyncio.run(run(False))
    assert servicer.num_generate_calls == calls_before + 40
    assert multiplexed == per_call
    assert [len(chunks) for chunks in multiplexed] == [1 + i % 5 for i in range(40)]


def test_stream_gets_fresh_request_ids_and_refuses_a_duplicate_in_flight(fake_server):
    address, _ = fake_server

    async def main() -> None:
        async with AsyncClient(address) as client:
            first, second = await asyncio.gather(
                client.generate("a", max_tokens=1), client.generate("b", max_tokens=1)
            )
            assert first.request_id.startswith("req-") and second.request_id.startswith("req-")
            assert first.request_id != second.request_id
            slow = asyncio.ensure_future(client.generate("slow", request_id="mine"))
            await asyncio.sleep(0.1)
            with pytest.raises(InvalidRequest, match="mine is already in flight"):
                await client.generate("x", request_id="mine")
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow

    asyncio.run(main())


def test_a_deadline_on_the_stream_cancels_only_that_request(fake_server):
    address, servicer = fake_server

    async def main() -> None:
        async with AsyncClient(address) as client:
            other = asyncio.ensure_future(client.generate("y", max_tokens=50))
            with pytest.raises(RequestTimeout, match=r"0\.3 s"):
                await client.generate("slow", request_id="too-slow", timeout_s=0.3)
            assert (await other).finish_reason == "length"
            await wait_cancelled(servicer, ["too-slow"])

    asyncio.run(main())


def test_closing_the_client_aborts_what_is_in_flight(fake_server):
    address, servicer = fake_server

    async def main() -> None:
        client = AsyncClient(address)
        pending = [
            asyncio.ensure_future(client.generate("slow", request_id=f"open-{i}")) for i in range(3)
        ]
        await asyncio.sleep(0.2)
        await client.close()
        for task in pending:
            with pytest.raises(DistserveError, match="closed"):
                await task
        await wait_cancelled(servicer, [f"open-{i}" for i in range(3)])

    asyncio.run(main())


def test_a_router_without_generate_stream_is_served_one_call_per_request():
    with serve_fake_generation(serves_stream=False) as (address, servicer):

        async def main() -> None:
            async with AsyncClient(address) as client:
                # grpc's core now and then reports the refused stream as INTERNAL rather than
                # UNIMPLEMENTED: that request is still served (one call), and the client tries
                # the stream again on the next one until it hears UNIMPLEMENTED
                for _ in range(6):
                    done = await client.generate("a b", max_tokens=3)
                    assert done.token_ids == [100, 101, 102]
                    if not client.multiplex:
                        break
                assert not client.multiplex  # it went back to one call per request
                before = servicer.num_generate_calls
                await client.generate("c", max_tokens=1)
                assert servicer.num_generate_calls == before + 1

        asyncio.run(main())
        assert servicer.num_stream_calls == 0
