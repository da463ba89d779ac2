"""A simulated instance: the ``Instance`` gRPC service and the registry protocol, without a model.

It stands in for a real instance driver where what is measured or tested is everything *but*
the model: the router's request path (benchmarks/router_throughput.py), routing decisions, the
protocol. To the router it is indistinguishable from a real driver:

    SimulatedInstance(options)
        ├─ grpc.aio server: Instance service (Session, Prefill, Decode, Generate, Abort,
        │                   GetStats, PullKV, ReleaseKV) + grpc.health.v1
        ├─ Register with the router: the checkpoint's fingerprint and KV layout, as a real
        │  instance computes them from the same folder (no weights are loaded)
        └─ every heartbeat: Report(load + prefix-cache events); re-register if forgotten

What it simulates, per request:

    Prefill   sleep prefill_delay_s ─▶ first token ─▶ KV lease (released by PullKV, ReleaseKV or
              after lease_timeout_s) ─▶ blocks enter a simulated LRU prefix cache, whose stored /
              evicted block hashes go out with the next heartbeat, as a real prefix cache's do
    Decode    layout + block-count checks ─▶ PullKV on the prefill instance (as a real decode
              instance pulls; ``pull_kv=False`` skips it) ─▶ (max_tokens - 1) tokens, one per
              chunk, each after decode_delay_s
    Generate  (colocated) both of the above on one instance, without the lease

Prefill, Decode and Generate answer the same on their own RPCs and on the router's Session
stream (``instance/session.py`` serves both from the methods ``prefill``, ``decode`` and
``generate``); an abort entry or a cancelled call frees the request's simulated blocks.

Output tokens are the prompt's own tokens, repeated: always valid ids of the checkpoint's
vocabulary. Nothing here is real about time or memory except what the options say; it never
runs on the serving path of a real cluster.

    python -m distserve.instance.simulated --router HOST:PORT --model DIR --prefill 2 --decode 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from distserve._proto import instance_pb2, instance_pb2_grpc
from distserve.engine.block_hash import block_hashes
from distserve.engine.kv_spec import KVCacheSpec
from distserve.instance.registration import RegistrationRefused, register
from distserve.instance.session import CallError, RequestRPCs
from distserve.protocol import (
    layout_mismatch,
    layout_to_proto,
    model_fingerprint,
    sampling_from_proto,
)
from distserve.rpc.options import channel_options, server_options

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulatedOptions:
    instance_id: str
    role: str  # "prefill" | "decode" | "colocated"
    model: str  # checkpoint folder: its config gives the KV layout and fingerprint (no weights)
    router_address: str | None  # host:port of the router; None: run unregistered
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    block_size: int = 16
    dtype: str = "float32"  # what a real CPU instance uses for dtype "auto"
    num_kv_blocks: int = 4096
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    prefill_delay_s: float = 0.0  # simulated time to prefill one request
    decode_delay_s: float = 0.0  # simulated time per decoded token
    heartbeat_s: float = 0.5
    lease_timeout_s: float = 30.0
    world_id: str = "simulated"  # instances exchange KV only within one world
    pull_kv: bool = True  # decode: call PullKV on the prefill instance, as a real one does

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"role must be prefill, decode or colocated, got {self.role!r}")
        if self.prefill_delay_s < 0 or self.decode_delay_s < 0:
            raise ValueError("simulated delays must be >= 0")


@dataclass
class _Lease:
    num_blocks: int
    expires_s: float


class SimulatedInstance(RequestRPCs):
    """One simulated instance: its gRPC server, its registration and its heartbeats."""

    def __init__(self, options: SimulatedOptions) -> None:
        from distserve.model.config import ModelConfig

        self.options = options
        model_config = ModelConfig.from_pretrained(options.model)
        self.kv_spec: KVCacheSpec = model_config.kv_spec(options.block_size, options.dtype)
        self.layout = layout_to_proto(self.kv_spec, model_fingerprint(options.model))
        self.vocab_size = model_config.vocab_size
        self.max_model_len = min(
            options.max_model_len or model_config.max_position_embeddings,
            model_config.max_position_embeddings,
            options.num_kv_blocks * options.block_size,
        )
        self.address = ""
        self.server: grpc.aio.Server | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: set[asyncio.Task] = set()
        self._running: dict[str, int] = {}  # request id -> blocks it holds
        self._aborted: set[str] = set()
        self._leases: dict[str, _Lease] = {}  # transfer id -> lease
        self._cache: OrderedDict[int, None] = OrderedDict()  # LRU of cached block hashes
        self._stored: list[int] = []  # prefix-cache events since the last report
        self._evicted: list[int] = []
        self._pull_seq = itertools.count()
        self._report_seq = 0
        self.num_requests = 0  # requests served (for tests and benchmarks)

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> str:
        o = self.options
        self.server = grpc.aio.server(options=server_options())
        port = self.server.add_insecure_port(f"{o.host}:{o.port}")
        self.address = f"{o.host}:{port}"
        instance_pb2_grpc.add_InstanceServicer_to_server(self, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if o.router_address:
            await self.register()
            self._spawn(self._heartbeat_forever())
        return self.address

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(grace=0.5)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def descriptor(self) -> instance_pb2.InstanceDescriptor:
        o = self.options
        return instance_pb2.InstanceDescriptor(
            instance_id=o.instance_id,
            role=o.role,
            address=self.address,
            layout=self.layout,
            global_ranks=[0],
            num_kv_blocks=o.num_kv_blocks,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            transfer_backend="gloo",
            world_id=o.world_id,
        )

    async def register(self) -> None:
        address = self.options.router_address
        assert address
        await register(self._channel(address), self.descriptor(), address)

    async def _heartbeat_forever(self) -> None:
        stub = instance_pb2_grpc.RegistryStub(self._channel(self.options.router_address))
        while True:
            await asyncio.sleep(self.options.heartbeat_s)
            self._expire_leases()
            try:
                ack = await stub.Report(self.stats(drain_events=True), timeout=5)
                if not ack.known:
                    await self.register()
            except grpc.aio.AioRpcError as exc:
                logger.debug("heartbeat failed: %s", exc.details())

    def stats(self, drain_events: bool = False) -> instance_pb2.InstanceStats:
        used = sum(self._running.values()) + sum(
            lease.num_blocks for lease in self._leases.values()
        )
        stats = instance_pb2.InstanceStats(
            instance_id=self.options.instance_id,
            num_running=len(self._running),
            num_waiting=0,
            num_waiting_tokens=0,
            num_free_blocks=max(0, self.options.num_kv_blocks - used),
            num_total_blocks=self.options.num_kv_blocks,
            num_leased_blocks=sum(lease.num_blocks for lease in self._leases.values()),
            recent_tpot_s=self.options.decode_delay_s,
        )
        if drain_events:
            self._report_seq += 1
            stats.report_seq = self._report_seq
            stats.stored_block_hashes.extend(self._stored)
            stats.evicted_block_hashes.extend(self._evicted)
            self._stored, self._evicted = [], []
        return stats

    # ---- simulated engine ----------------------------------------------------------------
    def _prefill(self, ids: list[int]) -> int:
        """Touch the prompt's blocks in the prefix cache; returns the number of cached tokens."""
        hashes = block_hashes(ids, self.options.block_size)
        num_hit = 0
        for h in hashes:
            if h not in self._cache:
                break
            num_hit += 1
        for h in hashes:
            if h in self._cache:
                self._cache.move_to_end(h)
            else:
                self._cache[h] = None
                self._stored.append(h)
        while len(self._cache) > self.options.num_kv_blocks:
            self._evicted.append(self._cache.popitem(last=False)[0])
        return min(num_hit * self.options.block_size, len(ids) - 1)

    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.options.block_size)

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for transfer_id in [t for t, lease in self._leases.items() if lease.expires_s < now]:
            del self._leases[transfer_id]

    async def _tokens(
        self, rid: str, ids: list[int], params: object, start: int
    ) -> AsyncIterator[tuple[int, str]]:
        """Output tokens ``start..max_tokens-1`` with their finish reason ("" while running)."""
        max_tokens: int = params.max_tokens  # type: ignore[attr-defined]
        stop_ids = set(params.stop_token_ids)  # type: ignore[attr-defined]
        for i in range(start, max_tokens):
            if self.options.decode_delay_s:
                await asyncio.sleep(self.options.decode_delay_s)
            if rid in self._aborted:
                yield 0, "abort"
                return
            token = ids[i % len(ids)]
            if token in stop_ids:
                yield token, "stop"
                return
            yield token, "length" if i == max_tokens - 1 else ""

    # ---- request logic (raises CallError; shared by the RPCs and the Session stream) -------
    def _check(self, request: instance_pb2.EngineRequest, *roles: str) -> object:
        if self.options.role not in roles:
            raise CallError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.options.instance_id} is a {self.options.role} instance",
            )
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if not request.request_id:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        ids = request.prompt_token_ids
        if not ids or len(ids) >= self.max_model_len:
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt of {len(ids)} tokens does not fit a context of {self.max_model_len}",
            )
        if request.request_id in self._running:
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT, f"request {request.request_id} already exists"
            )
        return params

    async def prefill(self, request: instance_pb2.EngineRequest) -> instance_pb2.PrefillResponse:
        params = self._check(request, "prefill")
        rid, ids = request.request_id, list(request.prompt_token_ids)
        num_blocks = self._num_blocks(len(ids))
        self._running[rid] = num_blocks
        try:
            if self.options.prefill_delay_s:
                await asyncio.sleep(self.options.prefill_delay_s)
            num_cached = self._prefill(ids)
            self.num_requests += 1
            response = instance_pb2.PrefillResponse(
                request_id=rid, first_token_id=ids[0], num_cached_tokens=num_cached
            )
            if params.max_tokens <= 1 or ids[0] in params.stop_token_ids:  # type: ignore[attr-defined]
                response.finish_reason = "length" if params.max_tokens <= 1 else "stop"  # type: ignore[attr-defined]
                return response
            transfer_id = f"{self.options.instance_id}-{uuid.uuid4().hex[:12]}"
            self._leases[transfer_id] = _Lease(
                num_blocks, time.monotonic() + self.options.lease_timeout_s
            )
            kv = response.kv
            kv.instance_id = self.options.instance_id
            kv.address = self.address
            kv.transfer_id = transfer_id
            kv.num_blocks = num_blocks
            kv.num_tokens = len(ids)
            kv.src_ranks.append(0)
            kv.layout.CopyFrom(self.layout)
            return response
        finally:
            self._running.pop(rid, None)
            self._aborted.discard(rid)

    async def decode(
        self, request: instance_pb2.DecodeRequest
    ) -> AsyncIterator[instance_pb2.TokenChunk]:
        inner, kv = request.request, request.kv
        params = self._check(inner, "decode")
        mismatch = layout_mismatch(self.layout, kv.layout)
        if mismatch:
            raise CallError(
                grpc.StatusCode.FAILED_PRECONDITION, f"KV layout of {kv.instance_id}: {mismatch}"
            )
        rid, ids = inner.request_id, list(inner.prompt_token_ids)
        if kv.num_blocks != self._num_blocks(len(ids)):
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"KV handle has {kv.num_blocks} blocks for a {len(ids)}-token prompt",
            )
        self._running[rid] = kv.num_blocks
        try:
            chunk = instance_pb2.TokenChunk(request_id=rid)
            if self.options.pull_kv:
                start = time.monotonic()
                await self._pull(kv)
                chunk.transfer_s = time.monotonic() - start
                chunk.transfer_bytes = kv.num_blocks * self.kv_spec.block_bytes()
            async for token, finish_reason in self._tokens(rid, ids, params, 1):
                chunk.token_ids.append(token)
                chunk.finish_reason = finish_reason
                yield chunk
                chunk = instance_pb2.TokenChunk(request_id=rid)
            self.num_requests += 1
        finally:
            self._running.pop(rid, None)
            self._aborted.discard(rid)

    async def _pull(self, kv: instance_pb2.KVHandle) -> None:
        stub = instance_pb2_grpc.InstanceStub(self._channel(kv.address))
        request = instance_pb2.PullKVRequest(
            transfer_id=kv.transfer_id,
            seq_no=next(self._pull_seq),
            decode_instance_id=self.options.instance_id,
            dst_ranks=[0],
            num_blocks=kv.num_blocks,
        )
        try:
            await stub.PullKV(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise CallError(
                grpc.StatusCode.UNAVAILABLE,
                f"KV transfer {kv.transfer_id} failed: {exc.code().name}: {exc.details()}",
            ) from None

    async def generate(
        self, request: instance_pb2.EngineRequest
    ) -> AsyncIterator[instance_pb2.TokenChunk]:
        params = self._check(request, "colocated")
        rid, ids = request.request_id, list(request.prompt_token_ids)
        self._running[rid] = self._num_blocks(len(ids))
        try:
            if self.options.prefill_delay_s:
                await asyncio.sleep(self.options.prefill_delay_s)
            chunk = instance_pb2.TokenChunk(request_id=rid, num_cached_tokens=self._prefill(ids))
            finish_reason = ""
            if params.max_tokens <= 1 or ids[0] in params.stop_token_ids:  # type: ignore[attr-defined]
                finish_reason = "length" if params.max_tokens <= 1 else "stop"  # type: ignore[attr-defined]
            chunk.token_ids.append(ids[0])
            chunk.finish_reason = finish_reason
            yield chunk
            if not finish_reason:
                async for token, finish_reason in self._tokens(rid, ids, params, 1):
                    yield instance_pb2.TokenChunk(
                        request_id=rid, token_ids=[token], finish_reason=finish_reason
                    )
            self.num_requests += 1
        finally:
            self._running.pop(rid, None)
            self._aborted.discard(rid)

    # ---- Instance service ----------------------------------------------------------------
    async def Abort(
        self, request: instance_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> instance_pb2.AbortResponse:
        found = request.request_id in self._running
        if found:
            self._aborted.add(request.request_id)
        return instance_pb2.AbortResponse(found=found)

    async def GetStats(
        self, request: instance_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> instance_pb2.InstanceStats:
        return self.stats()

    async def PullKV(
        self, request: instance_pb2.PullKVRequest, context: grpc.aio.ServicerContext
    ) -> instance_pb2.PullKVResponse:
        if self.options.role != "prefill":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.options.instance_id} is a {self.options.role} instance",
            )
        lease = self._leases.pop(request.transfer_id, None)
        if lease is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"no KV lease {request.transfer_id} (expired, released or never made)",
            )
        if lease.num_blocks != request.num_blocks:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"lease {request.transfer_id} holds {lease.num_blocks} blocks, "
                f"{request.num_blocks} requested",
            )
        return instance_pb2.PullKVResponse()

    async def ReleaseKV(
        self, request: instance_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext
    ) -> instance_pb2.ReleaseKVResponse:
        if self.options.role != "prefill":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.options.instance_id} is a {self.options.role} instance",
            )
        found = self._leases.pop(request.transfer_id, None) is not None
        return instance_pb2.ReleaseKVResponse(found=found)

    # ---- helpers -------------------------------------------------------------------------
    def _channel(self, address: str | None) -> grpc.aio.Channel:
        assert address
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=channel_options())
        return self._channels[address]

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# ---- a process of simulated instances -------------------------------------------------------
def cluster_options(
    base: SimulatedOptions, num_prefill: int, num_decode: int, num_colocated: int = 0
) -> list[SimulatedOptions]:
    """Options for a simulated cluster: ``base`` with ids sim-prefill-0.., sim-decode-0.., ..."""
    counts = (("prefill", num_prefill), ("decode", num_decode), ("colocated", num_colocated))
    return [
        replace(base, instance_id=f"sim-{role}-{i}", role=role)
        for role, n in counts
        for i in range(n)
    ]


async def serve_simulated(
    options: list[SimulatedOptions], ready_file: str | Path | None = None
) -> int:
    """Run simulated instances until SIGINT/SIGTERM; ``ready_file`` gets their addresses."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    instances = [SimulatedInstance(o) for o in options]
    try:
        for instance in instances:
            await instance.start()
        if ready_file is not None:
            tmp = Path(f"{ready_file}.tmp")
            tmp.write_text(json.dumps({i.options.instance_id: i.address for i in instances}))
            tmp.replace(ready_file)
        await stop.wait()
    except RegistrationRefused as exc:
        logger.error("a simulated instance was refused by the router: %s", exc)
        return 3
    finally:
        for instance in instances:
            await instance.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--router", required=True, help="the router's gRPC host:port")
    parser.add_argument("--model", required=True, help="checkpoint folder (config only is read)")
    parser.add_argument("--prefill", type=int, default=1, help="simulated prefill instances")
    parser.add_argument("--decode", type=int, default=1, help="simulated decode instances")
    parser.add_argument("--colocated", type=int, default=0, help="simulated colocated instances")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=4096)
    parser.add_argument("--prefill-delay-ms", type=float, default=0.0)
    parser.add_argument("--decode-delay-ms", type=float, default=0.0, help="per output token")
    parser.add_argument("--heartbeat-s", type=float, default=0.5)
    parser.add_argument("--no-pull-kv", action="store_true", help="decode skips PullKV")
    parser.add_argument("--ready-file", help="write {instance_id: address} here once registered")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    base = SimulatedOptions(
        instance_id="",
        role="prefill",
        model=args.model,
        router_address=args.router,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        prefill_delay_s=args.prefill_delay_ms / 1e3,
        decode_delay_s=args.decode_delay_ms / 1e3,
        heartbeat_s=args.heartbeat_s,
        pull_kv=not args.no_pull_kv,
    )
    options = cluster_options(base, args.prefill, args.decode, args.colocated)
    return asyncio.run(serve_simulated(options, args.ready_file))


if __name__ == "__main__":
    raise SystemExit(main())
