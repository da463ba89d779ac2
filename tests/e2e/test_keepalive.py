"""gRPC keepalive on long-lived streams (``distserve.rpc.options``).

Pings keep flowing on an open stream that carries no data: a server with gRPC's default
settings answers that with GOAWAY "too_many_pings" and the stream dies. Our router and instance
servers accept the pings (idle streams outlive many intervals), and a peer that stops answering
fails its streams with UNAVAILABLE within an interval and a timeout instead of leaving them
hanging until a request's deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distserve._proto import instance_pb2, instance_pb2_grpc
from distserve.client import AsyncClient
from distserve.engine.sampling_params import SamplingParams
from distserve.protocol import sampling_to_proto
from distserve.rpc.options import channel_options, server_options
from tests.e2e.conftest import list_instances, make_cluster

# gRPC's client sends at most one ping a second without data, and a server with the defaults
# closes the connection at the third early ping (two "strikes" tolerated): about 4 s.
KEEPALIVE_S = 1.0
IDLE_S = 6.0


def test_options_follow_the_environment(monkeypatch):
    monkeypatch.setenv("DISTSERVE_GRPC_KEEPALIVE_S", "0.2")
    assert ("grpc.keepalive_time_ms", 200) in channel_options()
    assert ("grpc.keepalive_timeout_ms", 200) in channel_options()
    assert ("grpc.http2.ping_timeout_ms", 200) in channel_options()
    assert ("grpc.http2.min_ping_interval_without_data_ms", 100) in server_options()
    assert ("grpc.enable_retries", 0) in channel_options(retries=False)
    assert not [k for k, _ in channel_options(max_message_bytes=None) if "message_length" in k]
    monkeypatch.setenv("DISTSERVE_GRPC_KEEPALIVE_S", "0")
    with pytest.raises(ValueError, match="DISTSERVE_GRPC_KEEPALIVE_S"):
        channel_options()
    monkeypatch.delenv("DISTSERVE_GRPC_KEEPALIVE_S")
    assert ("grpc.keepalive_time_ms", 30_000) in channel_options()


# ---- a bare health server: what the options alone do ---------------------------------------
SERVER = textwrap.dedent(
    """
    import asyncio, sys
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc
    from distserve.rpc.options import server_options

    async def main(ours):
        server = grpc.aio.server(options=server_options() if ours else None)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(main(sys.argv[1] == "ours"))
    """
)


def start_health_server(options: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "DISTSERVE_GRPC_KEEPALIVE_S": str(KEEPALIVE_S)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, options], stdout=subprocess.PIPE, text=True, env=env
    )
    port = proc.stdout.readline().strip()
    assert port, "the health server did not start"
    return proc, f"127.0.0.1:{port}"


async def watch_for(address: str, seconds: float) -> str:
    """Hold a health Watch stream open and idle for ``seconds``: "open" if it still is, else
    the status code that ended it."""
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        await call.read()  # the first status: the stream is up
        try:
            await asyncio.wait_for(call.read(), seconds)
        except TimeoutError:
            call.cancel()
            return "open"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "answered"


@pytest.mark.parametrize("options", ["ours", "grpc-defaults"])
def test_an_idle_stream_outlives_many_pings_only_with_our_server_options(options, monkeypatch):
    monkeypatch.setenv("DISTSERVE_GRPC_KEEPALIVE_S", str(KEEPALIVE_S))
    proc, address = start_health_server(options)
    try:
        outcome = asyncio.run(watch_for(address, IDLE_S))
    finally:
        proc.kill()
        proc.wait()
    # gRPC's defaults close a connection that pings without data ("too_many_pings")
    assert outcome == ("open" if options == "ours" else "UNAVAILABLE")


def test_a_peer_that_stops_answering_fails_its_streams(monkeypatch):
    monkeypatch.setenv("DISTSERVE_GRPC_KEEPALIVE_S", str(KEEPALIVE_S))
    proc, address = start_health_server("ours")

    async def main() -> tuple[str, float]:
        async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            await call.read()
            os.kill(proc.pid, signal.SIGSTOP)  # the connection stays up; nothing answers
            start = time.monotonic()
            try:
                await asyncio.wait_for(call.read(), 30)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, time.monotonic() - start
            return "answered", time.monotonic() - start

    try:
        code, waited = asyncio.run(main())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert code == "UNAVAILABLE"
    assert waited < 10  # an interval and a timeout, not the 30 s deadline


# ---- a real cluster: the router's and the instance's servers --------------------------------
def test_idle_client_and_session_streams_stay_open_on_a_cluster(cluster_model, monkeypatch):
    monkeypatch.setenv("DISTSERVE_GRPC_KEEPALIVE_S", str(KEEPALIVE_S))  # every process
    with make_cluster(cluster_model, colocated={"instances": 1}) as cluster:
        first, second, direct = asyncio.run(_idle_streams(cluster))
    assert second == first
    assert direct == first


async def _idle_streams(cluster) -> tuple[list[int], list[int], list[int]]:
    prompt = [5, 6, 7, 8, 9]
    client = AsyncClient(cluster.grpc_address, multiplex=True)
    try:
        first = await client.generate(prompt, max_tokens=4, ignore_eos=True, temperature=0.0)
        stream = client._stream
        await asyncio.sleep(IDLE_S)  # the GenerateStream (and the router's Session) sit idle
        second = await client.generate(prompt, max_tokens=4, ignore_eos=True, temperature=0.0)
        assert client._stream is stream and not stream.is_dead, "the client's stream was reopened"
    finally:
        await client.close()

    # an instance's Session stream opened by hand, idle, then one request on it
    [info] = list_instances(cluster.grpc_address)
    answered = asyncio.Event()
    request = instance_pb2.EngineRequest(
        request_id="idle-session",
        prompt_token_ids=prompt,
        sampling=sampling_to_proto(SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)),
    )

    async def calls():
        await asyncio.sleep(IDLE_S)
        yield instance_pb2.SessionCalls(calls=[instance_pb2.SessionCall(generate=request)])
        await answered.wait()  # half-close only once the answer is in

    tokens: list[int] = []
    async with grpc.aio.insecure_channel(
        info.descriptor.address, options=channel_options()
    ) as channel:
        async for msg in instance_pb2_grpc.InstanceStub(channel).Session(calls()):
            for event in msg.events:
                assert event.WhichOneof("kind") == "tokens", event
                tokens += event.tokens.token_ids
                if event.tokens.finish_reason:
                    answered.set()
    return first.token_ids, second.token_ids, tokens
