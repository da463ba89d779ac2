"""The router's ``GenerateStream``: many requests multiplexed on one client stream, over real gRPC.

A real router (``RouterServer``) with simulated instances registered with it, as in
``test_simulated_instances.py``; the client side is the raw stub, so that what is checked is
the protocol itself (the SDK's multiplexed mode is tested in tests/client and tests/e2e).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import grpc
import pytest

from distserve._proto import generation_pb2
from distserve.rpc.multiplex import STATUS_CODES
from tests.router.test_simulated_instances import _generate, _request, _serve

StatusCode = grpc.StatusCode


def prompt(i: int) -> list[int]:
    """A prompt of its own per request (no two share a first block: no prefix-cache hits)."""
    return [100 + i] + [(7 * i + k) % 50 + 10 for k in range(2 + i % 7)]


def entry(request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateCall:
    return generation_pb2.GenerateCall(request=request)


def cancel(rid: str) -> generation_pb2.GenerateCall:
    return generation_pb2.GenerateCall(cancel=rid)


async def run_stream(stub, messages: list[list[generation_pb2.GenerateCall]]):
    """Send ``messages``, half-close, and read until the router ends the stream: the events
    by request id, and how many messages carried them."""
    call = stub.GenerateStream(timeout=30)
    for calls in messages:
        await call.write(generation_pb2.GenerateCalls(calls=calls))
    await call.done_writing()
    events: dict[str, list[generation_pb2.GenerateEvent]] = defaultdict(list)
    num_messages = 0
    async for message in call:
        num_messages += 1
        for event in message.events:
            events[event.request_id].append(event)
    assert await call.code() == StatusCode.OK
    return events, num_messages


async def read_until(call, events, predicate) -> None:
    """Read events into ``events`` (by request id) until ``predicate()`` holds."""
    while not predicate():
        message = await asyncio.wait_for(call.read(), 10)
        assert message is not grpc.aio.EOF, "the router ended the stream early"
        for event in message.events:
            events[event.request_id].append(event)


async def read_to_end(call, events) -> None:
    """Read events into ``events`` (by request id) until the router ends the stream."""
    while (message := await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
        for event in message.events:
            events[event.request_id].append(event)


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def status(event: generation_pb2.GenerateEvent) -> tuple[StatusCode, str]:
    assert event.HasField("error"), event
    return STATUS_CODES[event.error.code], event.error.details


def finished(events: list[generation_pb2.GenerateEvent]) -> bool:
    return bool(events) and (events[-1].HasField("error") or bool(events[-1].chunk.finish_reason))


@pytest.mark.parametrize("shape", [(1, 1, 0), (0, 0, 1)], ids=["1p1d", "colocated"])
def test_many_requests_on_one_stream_equal_per_call_generate_chunk_for_chunk(tiny_llama, shape):
    requests = [_request(prompt(i), 1 + i % 6, f"r{i}") for i in range(40)]
    text = generation_pb2.GenerateRequest(
        request_id="text",
        text="Hello there, how are you?",
        sampling=generation_pb2.SamplingOptions(max_tokens=5, temperature=0),
    )
    requests.append(text)
    answers: dict[str, list] = {}

    async def per_call(stub, router, instances):
        results = await asyncio.gather(*(_generate(stub, r) for r in requests))
        answers["per-call"] = results

    async def streamed(stub, router, instances):
        # the first 16 in one message, the rest one per message
        messages = [[entry(r) for r in requests[:16]]] + [[entry(r)] for r in requests[16:]]
        events, num_messages = await run_stream(stub, messages)
        assert set(events) == {r.request_id for r in requests}
        assert not any(e.HasField("error") for evs in events.values() for e in evs)
        answers["stream"] = [[e.chunk for e in events[r.request_id]] for r in requests]
        # batched: fewer messages than events
        assert num_messages < sum(len(evs) for evs in events.values())
        await wait_until(lambda: all(not i._running for i in instances))

    # each on a fresh cluster, so that neither finds the other's prompts in a prefix cache
    asyncio.run(_serve(tiny_llama, "round_robin", *shape, per_call))
    asyncio.run(_serve(tiny_llama, "round_robin", *shape, streamed))
    for i, (want, got) in enumerate(zip(answers["per-call"], answers["stream"], strict=True)):
        assert got == want, requests[i].request_id
    last = answers["stream"][0][-1]
    assert last.finish_reason == "length" and last.usage.completion_tokens == 1
    assert "".join(c.text for c in answers["stream"][-1])  # the text prompt was detokenized


def test_a_bad_request_fails_alone_with_the_status_generate_gives(tiny_llama):
    bad_top_p = _request(prompt(1), 4, "bad-top-p")
    bad_top_p.sampling.top_p = 2.0
    bad = {
        "bad-top-p": bad_top_p,
        "bad-token": _request([10**9], 2, "bad-token"),
        "no-prompt": generation_pb2.GenerateRequest(request_id="no-prompt"),
        "too-long": _request([5] * 100_000, 2, "too-long"),
    }

    async def body(stub, router, instances):
        # what Generate ends each bad request with
        want = {}
        for rid, request in bad.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _generate(stub, request)
            want[rid] = (err.value.code(), err.value.details())
        assert {code for code, _ in want.values()} == {StatusCode.INVALID_ARGUMENT}

        good = [_request(prompt(i), 6, f"ok{i}") for i in range(6)]
        no_id = _request(prompt(9), 2, "")
        calls = [entry(good[0]), entry(good[1]), *(entry(r) for r in bad.values())]
        calls += [entry(no_id), entry(good[2])]
        events, _ = await run_stream(stub, [calls, [entry(r) for r in good[3:]]])
        for rid in bad:
            (event,) = events[rid]
            assert status(event) == want[rid]
        (event,) = events[""]
        assert status(event) == (StatusCode.INVALID_ARGUMENT, "request_id is required")
        for i, request in enumerate(good):
            chunks = [e.chunk for e in events[request.request_id]]
            assert [t for c in chunks for t in c.token_ids] == repeated(prompt(i), 6)
            assert chunks[-1].finish_reason == "length"

    asyncio.run(_serve(tiny_llama, "round_robin", 1, 1, 0, body))


def test_unavailable_when_the_cluster_cannot_serve_as_generate_says(tiny_llama):
    async def body(stub, router, instances):
        prefill = next(i for i in instances if i.options.role == "prefill")
        await prefill.stop()  # the only prefill instance dies; the router has not noticed yet
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _generate(stub, _request(prompt(1), 3, "lost"))
        assert err.value.code() == StatusCode.UNAVAILABLE
        events, _ = await run_stream(stub, [[entry(_request(prompt(2), 3, "lost"))]])
        (event,) = events["lost"]
        assert status(event) == (StatusCode.UNAVAILABLE, err.value.details())

    asyncio.run(_serve(tiny_llama, "round_robin", 1, 1, 0, body))


def test_a_cancel_entry_aborts_the_request_on_the_instance(tiny_llama):
    async def body(stub, router, instances):
        decode = next(i for i in instances if i.options.role == "decode")
        call = stub.GenerateStream(timeout=30)
        events: dict[str, list] = defaultdict(list)
        long, other = _request(prompt(1), 10_000, "long"), _request(prompt(2), 40, "other")
        await call.write(generation_pb2.GenerateCalls(calls=[entry(long), entry(other)]))
        await read_until(call, events, lambda: len(events["long"]) >= 3)
        assert "long" in decode._running
        await call.write(generation_pb2.GenerateCalls(calls=[cancel("long")]))
        await wait_until(lambda: "long" not in decode._running)
        # the other request goes on to its end on the same stream
        await read_until(call, events, lambda: finished(events["other"]))
        assert sum(len(e.chunk.token_ids) for e in events["other"]) == 40
        assert not finished(events["long"])
        # the stream still serves, also a new request under the cancelled one's id
        await call.write(
            generation_pb2.GenerateCalls(calls=[entry(_request([7, 8, 9], 2, "long"))])
        )
        await call.done_writing()
        await read_to_end(call, events)
        assert events["long"][-1].chunk.finish_reason == "length"
        assert events["long"][-1].chunk.usage.prompt_tokens == 3
        assert await call.code() == StatusCode.OK

    asyncio.run(_serve(tiny_llama, "round_robin", 1, 1, 0, body, decode_delay_s=0.02))


def test_a_duplicate_in_flight_request_id_is_refused_for_that_entry_only(tiny_llama):
    async def body(stub, router, instances):
        first, again = _request(prompt(1), 20, "dup"), _request(prompt(2), 3, "dup")
        call = stub.GenerateStream(timeout=30)
        await call.write(generation_pb2.GenerateCalls(calls=[entry(first)]))
        events: dict[str, list] = defaultdict(list)
        await read_until(call, events, lambda: len(events["dup"]) >= 1)
        await call.write(generation_pb2.GenerateCalls(calls=[entry(again)]))
        await call.done_writing()
        await read_to_end(call, events)
        (error,) = [e for e in events["dup"] if e.HasField("error")]
        assert status(error) == (StatusCode.INVALID_ARGUMENT, "request dup is already running")
        tokens = [t for e in events["dup"] if e.HasField("chunk") for t in e.chunk.token_ids]
        assert tokens == repeated(prompt(1), 20)  # the first request's, to its end

    asyncio.run(_serve(tiny_llama, "round_robin", 1, 1, 0, body, decode_delay_s=0.01))


def test_a_stream_that_goes_away_aborts_every_request_on_it(tiny_llama):
    async def body(stub, router, instances):
        decode = next(i for i in instances if i.options.role == "decode")
        call = stub.GenerateStream(timeout=30)
        calls = [entry(_request(prompt(i), 10_000, f"gone{i}")) for i in range(4)]
        await call.write(generation_pb2.GenerateCalls(calls=calls))
        events: dict[str, list] = defaultdict(list)
        await read_until(call, events, lambda: all(len(events[f"gone{i}"]) >= 2 for i in range(4)))
        assert len(decode._running) == 4
        call.cancel()
        await wait_until(lambda: not decode._running)
        assert all(not i._running for i in instances)
        # a new stream is served as before
        events2, _ = await run_stream(stub, [[entry(_request(prompt(5), 3, "after"))]])
        assert events2["after"][-1].chunk.finish_reason == "length"

    asyncio.run(_serve(tiny_llama, "round_robin", 1, 1, 0, body, decode_delay_s=0.02))


def repeated(ids: list[int], n: int) -> list[int]:
    """The simulated output of ``n`` tokens for prompt ``ids``: its own tokens, repeated."""
    return [ids[k % len(ids)] for k in range(n)]
