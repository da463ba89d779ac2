"""Run one instance's driver: engine thread + gRPC server + registration and heartbeats.

    serve_instance(engine, options)
        ├─ EngineLoop thread (the engine, its role handler)
        ├─ grpc.aio server: Instance service, grpc.health.v1
        ├─ Register with the router (refused → exit with the router's reason)
        └─ every heartbeat: Report(load + prefix-cache events); re-register if forgotten

Stops on SIGINT/SIGTERM or when the router refuses it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from distserve._proto import instance_pb2, instance_pb2_grpc
from distserve.engine.block_pool import BlockEvents
from distserve.engine.llm_engine import InstanceTransferResult, LLMEngine
from distserve.engine.request import Request
from distserve.engine.role_schedulers import PrefillScheduler
from distserve.instance.engine_loop import EngineLoop
from distserve.instance.registration import RegistrationRefused, register
from distserve.instance.roles import DecodeRole, PrefillRole, PullInfo, RoleHandler
from distserve.instance.servicer import InstanceServicer
from distserve.protocol import layout_to_proto, model_fingerprint
from distserve.router.metrics import InstanceMetrics
from distserve.rpc.options import channel_options, server_options
from distserve.transfer import TransferDescriptor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceOptions:
    instance_id: str
    role: str  # "prefill" | "decode" | "colocated"
    ranks: tuple[int, ...]  # global ranks, by TP rank
    router_address: str | None  # host:port of the router's gRPC server; None: run unregistered
    host: str = "127.0.0.1"  # the address other processes reach this instance at
    port: int = 0  # 0 = any free port
    heartbeat_s: float = 0.5
    lease_timeout_s: float = 30.0
    transfer_backend: str = "gloo"
    world_id: str = ""


class InstanceRuntime:
    """Everything one instance driver runs, started and stopped together."""

    def __init__(self, engine: LLMEngine, options: InstanceOptions) -> None:
        self.engine = engine
        self.options = options
        self.layout = layout_to_proto(engine.kv_spec, model_fingerprint(engine.config.model))
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: set[asyncio.Task] = set()
        self._report_seq = 0
        self._unreported = BlockEvents()  # prefix-cache events no Report has delivered yet
        self.address = ""
        self.server: grpc.aio.Server | None = None
        self.loop: EngineLoop | None = None
        self.servicer: InstanceServicer | None = None
        self.metrics = InstanceMetrics(
            options.instance_id, options.role, Path(engine.config.model).name
        )
        self.metrics_url = ""
        self._metrics_server: Any = None
        engine.on_request_done = self._observe_request

    def _make_role(self) -> RoleHandler:
        o = self.options
        if o.role == "prefill":
            return PrefillRole(self.engine, o.ranks, o.lease_timeout_s)
        if o.role == "decode":
            return DecodeRole(self.engine, o.instance_id, o.ranks, self._start_pull)
        return RoleHandler(self.engine)

    async def start(self) -> str:
        aio = asyncio.get_running_loop()
        self._aio = aio
        role = self._make_role()
        self.loop = EngineLoop(self.engine, role, aio, on_transfers=self._observe_transfers)
        self._metrics_server, _ = self.metrics.start_http_server(0, addr=self.options.host)
        self.metrics_url = f"http://{self.options.host}:{self._metrics_server.server_port}/metrics"
        role.attach(self.loop)
        self.server = grpc.aio.server(options=server_options())
        port = self.server.add_insecure_port(f"{self.options.host}:{self.options.port}")
        self.address = f"{self.options.host}:{port}"
        self.servicer = servicer = InstanceServicer(
            self.loop,
            self.options.instance_id,
            self.options.role,
            self.address,
            self.options.ranks,
            self.layout,
            self._stats,
        )
        instance_pb2_grpc.add_InstanceServicer_to_server(servicer, self.server)
        self.health = (
            health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.server.start()
        self.loop.start()
        await _set_health(self.health, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "%s (%s) serving on %s", self.options.instance_id, self.options.role, self.address
        )
        return self.address

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.servicer is not None:
            self.servicer.draining = True  # refuse what arrives on open sessions meanwhile
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.loop is not None:
            self.loop.stop()
        for channel in self._channels.values():
            await channel.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.engine.shutdown()

    # ---- registration and heartbeats -----------------------------------------------------
    def descriptor(self) -> instance_pb2.InstanceDescriptor:
        o = self.options
        return instance_pb2.InstanceDescriptor(
            instance_id=o.instance_id,
            role=o.role,
            address=self.address,
            layout=self.layout,
            global_ranks=list(o.ranks),
            num_kv_blocks=self.engine.num_blocks,
            max_model_len=self.engine.max_model_len,
            vocab_size=self.engine.model_config.vocab_size,
            transfer_backend=o.transfer_backend,
            world_id=o.world_id,
            metrics_url=self.metrics_url,
        )

    async def register(self) -> None:
        address = self.options.router_address
        assert address
        await register(self._channel(address), self.descriptor(), address)

    async def heartbeat_forever(self) -> None:
        from distserve._proto import instance_pb2_grpc as pb

        stub = pb.RegistryStub(self._channel(self.options.router_address))
        while True:
            await asyncio.sleep(self.options.heartbeat_s)
            assert self.loop is not None
            try:
                stats = await self.loop.call(self._report_stats)
                ack = await stub.Report(stats, timeout=5)
                self._unreported = BlockEvents()  # the router has them now
                if not ack.known:
                    await self.register()
            except grpc.aio.AioRpcError as exc:
                logger.debug("heartbeat failed: %s", exc.details())

    def _report_stats(self) -> instance_pb2.InstanceStats:
        """A heartbeat's stats (engine thread): with the prefix-cache events not yet reported.

        Events stay pending until a Report carrying them succeeds, so a lost heartbeat loses
        none; newer events are netted into them.
        """
        self._unreported = self._unreported.then(self.engine.kv.drain_events())
        self._report_seq += 1
        return self._stats(self._unreported)

    def _stats(self, events: BlockEvents | None = None) -> instance_pb2.InstanceStats:
        """Load and cache stats (engine thread). GetStats callers get no events: only the
        heartbeat takes them, so that a monitoring call cannot steal them from the router."""
        engine, kv, sched = self.engine, self.engine.kv, self.engine.scheduler
        waiting = [*sched.waiting.values(), *getattr(sched, "awaiting_kv", ())]
        events = events if events is not None else BlockEvents()
        self.metrics.set_load(len(waiting), len(sched.running), kv.usage, kv.pool.stats.hit_rate)
        return instance_pb2.InstanceStats(
            instance_id=self.options.instance_id,
            num_running=len(sched.running),
            num_waiting=len(waiting),
            num_waiting_tokens=sum(r.num_tokens - r.num_computed_tokens for r in waiting),
            num_free_blocks=kv.num_free_blocks,
            num_total_blocks=engine.num_blocks,
            num_leased_blocks=sched.num_leased_blocks if isinstance(sched, PrefillScheduler) else 0,
            num_pending_transfers=engine.num_transfers_in_flight,
            prefix_hit_rate=kv.pool.stats.hit_rate,
            recent_tpot_s=self.loop.last_step_s if self.loop else 0.0,
            stored_block_hashes=events.stored,
            evicted_block_hashes=events.evicted,
            report_seq=self._report_seq,
        )

    # ---- metrics (engine thread) ---------------------------------------------------------
    def _observe_request(self, req: Request) -> None:
        first, done = req.first_token_s, req.finished_s
        ttft = first - req.arrival_s if first is not None else None
        n = req.num_output_tokens
        tpot = (
            (done - first) / (n - 1) if done is not None and first is not None and n > 1 else None
        )
        end = done if done is not None else (first or req.arrival_s)
        self.metrics.observe_request(
            ttft,
            tpot,
            end - req.arrival_s,
            finish_reason=req.status.value,
            num_prompt_tokens=req.num_prompt_tokens,
            num_completion_tokens=n,
            num_cached_tokens=req.num_cached_tokens,
        )

    def _observe_transfers(self, results: list[InstanceTransferResult]) -> None:
        direction = "send" if self.options.role == "prefill" else "recv"
        for result in results:
            if result.ok:
                self.metrics.observe_transfer(result.num_bytes, result.elapsed_s, direction)

    # ---- KV pulls (decode side) ----------------------------------------------------------
    def _channel(self, address: str | None) -> grpc.aio.Channel:
        assert address
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=channel_options())
        return self._channels[address]

    def _start_pull(self, info: PullInfo, desc: TransferDescriptor) -> None:
        """Called on the engine thread right after the receives were queued."""
        self._aio.call_soon_threadsafe(self._spawn, self._pull(info, desc))

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pull(self, info: PullInfo, desc: TransferDescriptor) -> None:
        stub = instance_pb2_grpc.InstanceStub(self._channel(info.address))
        request = instance_pb2.PullKVRequest(
            transfer_id=desc.transfer_id,
            seq_no=desc.seq_no,
            decode_instance_id=self.options.instance_id,
            dst_ranks=list(desc.dst_ranks),
            num_blocks=desc.num_blocks,
        )
        try:
            await stub.PullKV(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            role: DecodeRole = self.loop.role  # type: ignore[union-attr]
            error = f"{exc.code().name}: {exc.details()}"
            await self.loop.call(lambda: role.pull_failed(desc.transfer_id, error))  # type: ignore[union-attr]


async def _set_health(servicer: object, status: int) -> None:
    result = servicer.set("", status)  # type: ignore[attr-defined]
    if asyncio.iscoroutine(result):
        await result


async def serve_instance(engine: LLMEngine, options: InstanceOptions) -> int:
    """Run an instance until a signal stops it; returns a process exit code."""
    runtime = InstanceRuntime(engine, options)
    stop = asyncio.Event()
    aio = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        aio.add_signal_handler(sig, stop.set)
    code = 0
    try:
        await runtime.start()
        if options.router_address:
            await runtime.register()
            runtime._spawn(runtime.heartbeat_forever())
            logger.info(
                "%s registered with the router at %s", options.instance_id, options.router_address
            )
        await stop.wait()
    except RegistrationRefused as exc:
        logger.error("%s was refused by the router: %s", options.instance_id, exc)
        code = 3
    finally:
        await runtime.stop()
    return code
