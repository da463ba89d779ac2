"""Router <-> instance sessions: many requests on one multiplexed stream, over real gRPC.

Simulated instances (``distserve/instance/simulated.py``) serve the ``Session`` stream with the
same pump as real instances (``distserve/instance/session.py``); the router's side is
:class:`InstanceSession` (``distserve/router/session.py``). Every server and channel is
closed at the end of each test, also when an assertion fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import grpc
import pytest

from distserve._proto import generation_pb2, instance_pb2
from distserve.instance.session import serve_session
from distserve.instance.simulated import SimulatedInstance, SimulatedOptions
from distserve.router.session import InstanceSession, SessionCallError

TIMEOUT_S = 10.0


class CountingInstance(SimulatedInstance):
    """A simulated instance that counts the Session messages and entries it receives."""

    def __init__(self, options: SimulatedOptions) -> None:
        super().__init__(options)
        self.num_call_messages = 0
        self.num_calls = 0
        self.message_shapes: list[tuple[int, int]] = []  # (entries, prompt token ids) a message

    async def Session(self, request_iterator, context):
        async def counted():
            async for message in request_iterator:
                self.num_call_messages += 1
                self.num_calls += len(message.calls)
                num_tokens = sum(len(call.prefill.prompt_token_ids) for call in message.calls)
                self.message_shapes.append((len(message.calls), num_tokens))
                yield message

        async for events in serve_session(self, counted()):
            yield events


@contextlib.asynccontextmanager
async def running(model, roles: list[str], **options):
    """Unregistered simulated instances of ``roles`` and a router-side session to each."""
    base = SimulatedOptions(
        instance_id="", role="prefill", model=str(model), router_address=None, block_size=4
    )
    instances: list[CountingInstance] = []
    channels: list[grpc.aio.Channel] = []
    sessions: list[InstanceSession] = []
    try:
        for i, role in enumerate(roles):
            instance = CountingInstance(
                replace(base, instance_id=f"sim-{role}-{i}", role=role, **options)
            )
            instances.append(instance)
            await instance.start()
            channels.append(grpc.aio.insecure_channel(instance.address))
            sessions.append(InstanceSession(instance.options.instance_id, channels[-1]))
        yield instances, sessions
    finally:
        for session in sessions:
            await session.close()
        for channel in channels:
            await channel.close()
        for instance in instances:
            await instance.stop()


def engine_request(
    rid: str, ids: list[int], max_tokens: int, **sampling
) -> instance_pb2.EngineRequest:
    return instance_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=ids,
        sampling=generation_pb2.SamplingOptions(
            max_tokens=max_tokens, temperature=0, ignore_eos=True, **sampling
        ),
    )


def prompt(i: int) -> list[int]:
    """A prompt of its own per request: 3..9 tokens, none shared with another prompt's start."""
    return [100 + i] + [(7 * i + k) % 50 + 10 for k in range(2 + i % 7)]


async def disaggregated(prefill: InstanceSession, decode: InstanceSession, request) -> list[int]:
    first = await prefill.prefill(request, TIMEOUT_S)
    tokens = [first.first_token_id]
    if first.finish_reason:
        return tokens
    decode_request = instance_pb2.DecodeRequest(
        request=request, first_token_id=first.first_token_id, kv=first.kv
    )
    last = None
    async for chunk in decode.decode(decode_request, TIMEOUT_S):
        assert chunk.request_id == request.request_id
        tokens.extend(chunk.token_ids)
        last = chunk
    assert last is not None and last.finish_reason == "length"
    return tokens


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def test_many_concurrent_requests_are_demultiplexed_on_one_stream(tiny_llama):
    async def main():
        async with running(tiny_llama, ["prefill", "decode"]) as (instances, sessions):
            prefill, decode = sessions
            requests = [engine_request(f"r{i}", prompt(i), 2 + i % 5) for i in range(64)]
            results = await asyncio.gather(*(disaggregated(prefill, decode, r) for r in requests))
            for i, tokens in enumerate(results):
                ids = prompt(i)
                # simulated output: the request's own prompt tokens, repeated
                assert tokens == [ids[k % len(ids)] for k in range(2 + i % 5)], i
            assert prefill.num_streams_opened == decode.num_streams_opened == 1
            assert prefill.num_in_flight == decode.num_in_flight == 0
            # the 64 prefills were sent in fewer messages than entries: batched
            assert instances[0].num_calls == 64
            assert instances[0].num_call_messages < 64
            assert instances[1].num_calls == 64
            assert instances[0]._running == {} and instances[1]._running == {}
            assert instances[0]._leases == {}  # every KV lease was pulled

        # colocated: many generate streams at once on one session
        async with running(tiny_llama, ["colocated"]) as (instances, (session,)):

            async def generate(i: int) -> list[int]:
                chunks = session.generate(engine_request(f"g{i}", prompt(i), 1 + i % 4), TIMEOUT_S)
                return [t async for c in chunks for t in c.token_ids]

            results = await asyncio.gather(*(generate(i) for i in range(48)))
            for i, tokens in enumerate(results):
                ids = prompt(i)
                assert tokens == [ids[k % len(ids)] for k in range(1 + i % 4)], i
            assert session.num_streams_opened == 1

    asyncio.run(main())


def test_a_batch_is_split_at_the_entry_and_token_caps(tiny_llama, monkeypatch):
    from distserve.router import session as session_module

    monkeypatch.setattr(session_module, "MAX_CALLS_PER_MESSAGE", 4)
    monkeypatch.setattr(session_module, "MAX_TOKENS_PER_MESSAGE", 12)

    async def main():
        async with running(tiny_llama, ["prefill"]) as (instances, (session,)):
            requests = [engine_request(f"c{i}", prompt(i), 2) for i in range(24)]
            # made in one go, so the entries wait in the outbox together
            answers = await asyncio.gather(*(session.prefill(r, TIMEOUT_S) for r in requests))
            assert [a.first_token_id for a in answers] == [prompt(i)[0] for i in range(24)]
            shapes = instances[0].message_shapes
            assert sum(n for n, _ in shapes) == 24
            assert all(n <= 4 and (tokens <= 12 or n == 1) for n, tokens in shapes), shapes
            assert any(n > 1 for n, _ in shapes)  # still batched under the caps

    asyncio.run(main())


def test_leaving_a_stream_early_sends_an_abort_that_frees_the_request(tiny_llama):
    async def main():
        async with running(tiny_llama, ["colocated"], decode_delay_s=0.02) as (
            instances,
            (session,),
        ):
            instance = instances[0]
            chunks = session.generate(engine_request("long", prompt(1), 10_000), TIMEOUT_S)
            received = 0
            async for chunk in chunks:
                received += len(chunk.token_ids)
                if received >= 3:
                    break
            assert "long" in instance._running  # still generating on the instance
            await chunks.aclose()  # what the router does when its client goes away
            await wait_until(lambda: "long" not in instance._running)
            assert session.num_in_flight == 0

        # a prefill whose caller is cancelled is aborted too
        async with running(tiny_llama, ["prefill"], prefill_delay_s=30.0) as (
            instances,
            (session,),
        ):
            instance = instances[0]
            task = asyncio.ensure_future(session.prefill(engine_request("p", prompt(2), 4)))
            await wait_until(lambda: "p" in instance._running)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: "p" not in instance._running)
            # the session still serves
            instance.options = replace(instance.options, prefill_delay_s=0.0)
            answer = await session.prefill(engine_request("p2", prompt(3), 4), TIMEOUT_S)
            assert answer.first_token_id == prompt(3)[0]
            assert session.num_streams_opened == 1

    asyncio.run(main())


def test_a_deadline_fails_the_request_and_aborts_it_on_the_instance(tiny_llama):
    async def main():
        async with running(tiny_llama, ["prefill"], prefill_delay_s=30.0) as (
            instances,
            (session,),
        ):
            with pytest.raises(SessionCallError) as err:
                await session.prefill(engine_request("slow", prompt(4), 4), timeout_s=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: not instances[0]._running)

    asyncio.run(main())


def test_an_error_on_one_request_does_not_disturb_the_others(tiny_llama):
    async def main():
        async with running(tiny_llama, ["colocated"], decode_delay_s=0.01) as (
            instances,
            (session,),
        ):

            async def generate(request) -> list[int]:
                return [t async for c in session.generate(request, TIMEOUT_S) for t in c.token_ids]

            async def code_of(awaitable) -> grpc.StatusCode:
                with pytest.raises(SessionCallError) as err:
                    await awaitable
                return err.value.code()

            good = [
                asyncio.ensure_future(generate(engine_request(f"ok{i}", prompt(i), 20)))
                for i in range(8)
            ]
            await asyncio.sleep(0.05)  # the good ones are running
            bad_sampling = engine_request("bad-top-p", prompt(1), 4, top_p=2.0)
            too_long = engine_request("too-long", [5] * 100_000, 4)
            duplicate = engine_request("ok3", prompt(3), 4)  # "ok3" is still running
            wrong_role = engine_request("wrong-role", prompt(2), 4)
            codes = await asyncio.gather(
                code_of(generate(bad_sampling)),
                code_of(generate(too_long)),
                code_of(generate(duplicate)),
                code_of(session.prefill(wrong_role, TIMEOUT_S)),
            )
            assert codes == [
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
            ]
            for i, tokens in enumerate(await asyncio.gather(*good)):
                ids = prompt(i)
                assert tokens == [ids[k % len(ids)] for k in range(20)]
            assert session.num_streams_opened == 1
            assert not instances[0]._running

    asyncio.run(main())


def test_a_dead_instance_fails_its_requests_unavailable_and_a_new_stream_recovers(tiny_llama):
    async def main():
        async with running(tiny_llama, ["colocated"], decode_delay_s=0.02) as (
            instances,
            (session,),
        ):
            instance = instances[0]
            port = int(instance.address.rsplit(":", 1)[1])
            pending = [
                asyncio.ensure_future(
                    _drain(session.generate(engine_request(f"d{i}", prompt(i), 10_000), TIMEOUT_S))
                )
                for i in range(5)
            ]
            await wait_until(lambda: len(instance._running) == 5)
            await instance.stop()  # the instance dies with 5 requests in flight
            for task in pending:
                with pytest.raises(SessionCallError) as err:
                    await task
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert session.num_in_flight == 0

            # the instance comes back at the same address: the next request opens a new stream
            instances[0] = revived = CountingInstance(replace(instance.options, port=port))
            await revived.start()
            tokens = await _drain(
                session.generate(engine_request("after", prompt(9), 3), TIMEOUT_S)
            )
            assert tokens == [prompt(9)[k] for k in range(3)]
            assert session.num_streams_opened == 2

            # a closed session (the instance left the registry) fails in flight and new requests
            revived.options = replace(revived.options, decode_delay_s=0.05)
            task = asyncio.ensure_future(
                _drain(session.generate(engine_request("cut", prompt(3), 10_000), TIMEOUT_S))
            )
            await wait_until(lambda: "cut" in revived._running)
            await session.close("the instance was removed")
            with pytest.raises(SessionCallError) as err:
                await task
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await wait_until(lambda: not revived._running)  # the instance aborted it
            with pytest.raises(SessionCallError) as err:
                await session.prefill(engine_request("late", prompt(1), 2), TIMEOUT_S)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


async def _drain(chunks) -> list[int]:
    return [t async for c in chunks for t in c.token_ids]
