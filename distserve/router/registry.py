"""The router's view of its instances: who registered, how loaded they are, who is alive.

Instances register themselves (``Registry.Register``); nothing is configured by address. A
registration is refused, with a sentence naming the difference, when the instance serves another
model checkpoint or another KV layout (dtype, block size, heads) than the cluster, or lives in
another torch.distributed world than the instances it would exchange KV with. Heartbeats
(``Registry.Report``) carry load and prefix-cache events, which go to the routing policy. An
instance silent for ``instance_timeout_s`` is dropped from routing.

Each record holds the router's channel to its instance and the :class:`InstanceSession` on it
(the stream that carries the router's requests, opened on first use). When an instance leaves
(expired, replaced by a new registration, router shutdown) its session is closed, failing what
was still in flight on it with UNAVAILABLE, and then its channel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from distserve._proto import instance_pb2, instance_pb2_grpc
from distserve.protocol import layout_mismatch
from distserve.router.policies.base import InstanceLoad, RoutingPolicy
from distserve.router.session import InstanceSession
from distserve.rpc.options import channel_options

logger = logging.getLogger(__name__)


@dataclass
class InstanceRecord:
    descriptor: instance_pb2.InstanceDescriptor
    channel: grpc.aio.Channel
    stub: instance_pb2_grpc.InstanceStub  # per-request RPCs (ReleaseKV)
    session: InstanceSession  # Prefill / Decode / Generate, multiplexed on one stream
    stats: instance_pb2.InstanceStats = field(default_factory=instance_pb2.InstanceStats)
    last_seen_s: float = field(default_factory=time.monotonic)
    _load: InstanceLoad | None = field(default=None, repr=False)  # load() of ``stats``

    @property
    def instance_id(self) -> str:
        return self.descriptor.instance_id

    @property
    def role(self) -> str:
        return self.descriptor.role

    def update(self, stats: instance_pb2.InstanceStats) -> None:
        """A heartbeat arrived with these stats."""
        self.stats = stats
        self.last_seen_s = time.monotonic()
        self._load = None

    def load(self) -> InstanceLoad:
        """The policies' snapshot of the last reported stats (made once per report: routing
        asks for it on every request, instances report a few times a second)."""
        if self._load is None:
            self._load = self._make_load()
        return self._load

    def _make_load(self) -> InstanceLoad:
        s = self.stats
        return InstanceLoad(
            instance_id=self.instance_id,
            role=self.role,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_waiting_tokens=s.num_waiting_tokens,
            free_kv_blocks=s.num_free_blocks
            if s.num_total_blocks
            else self.descriptor.num_kv_blocks,
            total_kv_blocks=s.num_total_blocks or self.descriptor.num_kv_blocks,
            recent_tpot_s=s.recent_tpot_s or None,
        )


class InstanceRegistry:
    def __init__(
        self,
        model_fingerprint: str,
        policy: RoutingPolicy,
        instance_timeout_s: float = 10.0,
        on_change: Callable[[], None] | None = None,
        metrics: Any = None,
    ) -> None:
        self.metrics = metrics  # a RouterMetrics: per-instance load gauges
        self.model_fingerprint = model_fingerprint
        self.policy = policy
        self.instance_timeout_s = instance_timeout_s
        self.instances: dict[str, InstanceRecord] = {}
        self._by_role: dict[str, list[InstanceRecord]] = {}  # rebuilt when instances change
        self._layout: instance_pb2.KVLayout | None = None  # set by the first registration
        self._world_id: str | None = None
        self._on_change = on_change
        self.changed = asyncio.Event()
        self._closing: set[asyncio.Task] = set()  # channel closes in flight

    # ---- queries -------------------------------------------------------------------------
    def by_role(self, role: str) -> list[InstanceRecord]:
        """The registered instances of ``role``, in registration order (a list to read only)."""
        return self._by_role.get(role, [])

    @property
    def layout(self) -> instance_pb2.KVLayout | None:
        return self._layout

    # ---- registration --------------------------------------------------------------------
    def check(self, d: instance_pb2.InstanceDescriptor) -> str | None:
        """Why ``d`` cannot join this cluster, or None."""
        if d.role not in ("prefill", "decode", "colocated"):
            return f"unknown role {d.role!r}"
        if not d.instance_id or not d.address:
            return "instance_id and address are required"
        if d.layout.model != self.model_fingerprint:
            return (
                f"model checkpoint differs: instance serves {d.layout.model}, "
                f"the router serves {self.model_fingerprint}"
            )
        others = [r for r in self.instances.values() if r.instance_id != d.instance_id]
        if self._layout is not None and others:
            mismatch = layout_mismatch(d.layout, self._layout)
            if mismatch:
                return f"KV layout differs from the cluster's: {mismatch}"
            if (
                d.role != "colocated"
                and self._world_id is not None
                and d.world_id != self._world_id
            ):
                return f"torch.distributed world {d.world_id!r} differs from the cluster's {self._world_id!r}"
        return None

    def register(self, d: instance_pb2.InstanceDescriptor) -> instance_pb2.RegisterResponse:
        reason = self.check(d)
        if reason:
            logger.error("refused instance %s: %s", d.instance_id, reason)
            return instance_pb2.RegisterResponse(accepted=False, reason=reason)
        old = self.instances.pop(d.instance_id, None)
        if old is not None:
            self.policy.remove_instance(d.instance_id)
            self._close_later(old, "the instance registered again")
        # a batch of Session events can be larger than one per-request answer (instances send
        # and accept up to 64 MiB); keepalive notices a dead instance host while it is idle
        channel = grpc.aio.insecure_channel(d.address, options=channel_options())
        self.instances[d.instance_id] = InstanceRecord(
            d,
            channel,
            instance_pb2_grpc.InstanceStub(channel),
            InstanceSession(d.instance_id, channel),
        )
        if self._layout is None or len(self.instances) == 1:
            self._layout = d.layout
        if d.role != "colocated" and self._world_id is None:
            self._world_id = d.world_id
        self.policy.add_instance(d.instance_id, d.role, d.num_kv_blocks)
        logger.info("instance %s (%s) registered at %s", d.instance_id, d.role, d.address)
        self._notify()
        return instance_pb2.RegisterResponse(accepted=True)

    def report(self, stats: instance_pb2.InstanceStats) -> bool:
        record = self.instances.get(stats.instance_id)
        if record is None:
            return False
        record.update(stats)
        if self.metrics is not None:
            usage = (
                1 - stats.num_free_blocks / stats.num_total_blocks
                if stats.num_total_blocks
                else 0.0
            )
            self.metrics.set_instance_load(
                stats.instance_id,
                stats.num_waiting,
                stats.num_running,
                usage,
                stats.prefix_hit_rate,
            )
        now = time.monotonic()
        if stats.stored_block_hashes:
            self.policy.on_blocks_stored(stats.instance_id, list(stats.stored_block_hashes), now)
        if stats.evicted_block_hashes:
            self.policy.on_blocks_evicted(stats.instance_id, list(stats.evicted_block_hashes))
        return True

    def remove(self, instance_id: str, why: str) -> None:
        record = self.instances.pop(instance_id, None)
        if record is None:
            return
        logger.warning("instance %s removed: %s", instance_id, why)
        if self.metrics is not None:
            self.metrics.remove_instance(instance_id)
        self.policy.remove_instance(instance_id)
        self._close_later(record, f"the instance was removed: {why}")
        self._notify()

    async def watch_liveness(self) -> None:
        """Drop instances whose heartbeats stopped."""
        while True:
            await asyncio.sleep(min(1.0, self.instance_timeout_s / 4))
            now = time.monotonic()
            for record in list(self.instances.values()):
                if now - record.last_seen_s > self.instance_timeout_s:
                    self.remove(
                        record.instance_id, f"no heartbeat for {now - record.last_seen_s:.1f}s"
                    )

    async def close(self) -> None:
        for record in self.instances.values():
            await _close(record, "the router is shutting down")
        self.instances.clear()
        self._by_role = {}
        await asyncio.gather(*self._closing, return_exceptions=True)

    def _close_later(self, record: InstanceRecord, why: str) -> None:
        task = asyncio.ensure_future(_close(record, why))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _notify(self) -> None:
        by_role: dict[str, list[InstanceRecord]] = {}
        for record in self.instances.values():
            by_role.setdefault(record.role, []).append(record)
        self._by_role = by_role
        self.changed.set()
        if self._on_change is not None:
            self._on_change()


async def _close(record: InstanceRecord, why: str) -> None:
    await record.session.close(why)
    await record.channel.close()


class RegistryServicer(instance_pb2_grpc.RegistryServicer):
    def __init__(self, registry: InstanceRegistry) -> None:
        self.registry = registry

    async def Register(
        self, request: instance_pb2.InstanceDescriptor, context: grpc.aio.ServicerContext
    ) -> instance_pb2.RegisterResponse:
        return self.registry.register(request)

    async def Report(
        self, request: instance_pb2.InstanceStats, context: grpc.aio.ServicerContext
    ) -> instance_pb2.ReportAck:
        return instance_pb2.ReportAck(known=self.registry.report(request))

    async def ListInstances(
        self, request: instance_pb2.ListInstancesRequest, context: grpc.aio.ServicerContext
    ) -> instance_pb2.InstanceList:
        now = time.monotonic()
        return instance_pb2.InstanceList(
            instances=[
                instance_pb2.InstanceInfo(
                    descriptor=r.descriptor, stats=r.stats, seconds_since_report=now - r.last_seen_s
                )
                for r in self.registry.instances.values()
            ]
        )
