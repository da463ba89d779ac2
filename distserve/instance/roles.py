"""What differs between a prefill, a decode and a colocated instance, around one engine.

Each role is a small handler the engine loop calls on its own thread: ``before_step`` (timers,
admission of KV pulls), ``on_outputs`` (route sampled tokens to request streams) and
``on_transfer_results``. No ``if role`` branches elsewhere.

Prefill — a request's life on this side::

    Prefill RPC ─▶ engine prefill ─▶ first token ─▶ lease(transfer_id, blocks, expiry)
         PullKV(transfer_id) ─▶ send on every rank ─▶ result ─▶ lease dropped, blocks freed
         lease expired / ReleaseKV ─▶ blocks freed; a later PullKV gets a VOID send (the
         decode side's posted receives are always filled, and it reports the failure)

Decode — a request's life on this side::

    Decode RPC ─▶ AWAITING_KV ─(room)─▶ blocks + receives posted, PullKV sent to the prefill
         ─▶ TRANSFERRING ─(every rank done)─▶ RUNNING ─▶ tokens streamed ─▶ finished
         a failed or cancelled pull frees the blocks only once every rank reported it
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from distserve.engine.llm_engine import EngineOutput, InstanceTransferResult, LLMEngine
from distserve.engine.request import RequestStatus
from distserve.engine.role_schedulers import DecodeScheduler, PrefillScheduler
from distserve.engine.worker import TransferOp
from distserve.instance.engine_loop import EngineLoop, StreamItem
from distserve.transfer import SeqNoAllocator, TransferDescriptor

logger = logging.getLogger(__name__)


@dataclass
class PrefillDone:
    """Payload of a prefill's first-token item: where its KV waits."""

    transfer_id: str
    num_blocks: int
    num_tokens: int
    num_cached_tokens: int


@dataclass
class TransferStats:
    """Payload of a decode request's first item: how its KV pull went."""

    num_bytes: int
    elapsed_s: float


@dataclass
class PullInfo:
    """What a decode request needs to pull its KV (from the router's KV handle)."""

    transfer_id: str
    num_blocks: int
    src_ranks: tuple[int, ...]
    address: str  # the prefill instance's gRPC address


class RoleHandler:
    """The colocated role, and the base of the others: tokens go straight to their streams."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.loop: EngineLoop | None = None

    def attach(self, loop: EngineLoop) -> None:
        self.loop = loop

    def before_step(self) -> None:
        pass

    def on_outputs(self, outputs: list[EngineOutput]) -> None:
        assert self.loop is not None
        for out in outputs:
            self.loop.emit(
                out.request_id,
                StreamItem(
                    out.new_token_ids, out.finish_reason, num_cached_tokens=out.num_cached_tokens
                ),
            )

    def on_transfer_results(self, results: list[InstanceTransferResult]) -> None:
        assert not results, "a colocated instance moves no KV"

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)


@dataclass
class _Lease:
    request_id: str
    block_ids: list[int]
    expires_s: float
    is_sending: bool = False


class PrefillRole(RoleHandler):
    def __init__(self, engine: LLMEngine, ranks: tuple[int, ...], lease_timeout_s: float) -> None:
        super().__init__(engine)
        assert isinstance(engine.scheduler, PrefillScheduler)
        self.ranks = ranks
        self.lease_timeout_s = lease_timeout_s
        self.leases: OrderedDict[str, _Lease] = OrderedDict()  # by transfer id, in expiry order
        self._by_request: dict[str, str] = {}

    def on_outputs(self, outputs: list[EngineOutput]) -> None:
        assert self.loop is not None
        for out in outputs:
            req = self.engine.requests.get(out.request_id)
            if req is None or req.status is not RequestStatus.PREFILLED:
                item = StreamItem(
                    out.new_token_ids,
                    out.finish_reason or "stop",
                    num_cached_tokens=out.num_cached_tokens,
                )
                self.loop.emit(out.request_id, item)
                continue
            transfer_id = f"{out.request_id}/kv"
            block_ids = self.engine.kv.block_ids(out.request_id)
            self.leases[transfer_id] = _Lease(
                out.request_id, block_ids, time.monotonic() + self.lease_timeout_s
            )
            self._by_request[out.request_id] = transfer_id
            done = PrefillDone(
                transfer_id, len(block_ids), req.num_prompt_tokens, req.num_cached_tokens
            )
            item = StreamItem(
                out.new_token_ids, None, payload=done, num_cached_tokens=out.num_cached_tokens
            )
            self.loop.emit(out.request_id, item)

    def before_step(self) -> None:
        now = time.monotonic()
        while self.leases:
            transfer_id, lease = next(iter(self.leases.items()))
            if lease.expires_s > now or lease.is_sending:
                break
            logger.warning("lease %s expired before its KV was pulled", transfer_id)
            self._drop(transfer_id)

    def pull(self, desc: TransferDescriptor) -> None:
        """Decode asked for ``desc``: send it from every rank, or a VOID send if the KV is gone."""
        # Every pull is answered, with the KV or with a VOID send of the right size: the decode
        # side has posted receives, and its link would stall behind an unanswered seq_no.
        lease = self.leases.get(desc.transfer_id)
        reason = None
        if lease is None:
            reason = "lease expired or released"
        elif lease.is_sending:
            reason = "already sent"
        elif desc.num_blocks != len(lease.block_ids):
            reason = f"pull of {desc.num_blocks} blocks for a lease of {len(lease.block_ids)}"
        if reason is not None or lease is None:
            logger.warning("answering pull %s with a void send: %s", desc.transfer_id, reason)
            self.engine.queue_transfer_op(
                TransferOp("void_send", desc.transfer_id, desc, reason=reason or "")
            )
            return
        lease.is_sending = True
        self.leases.move_to_end(desc.transfer_id)
        self.engine.queue_transfer_op(TransferOp("send", desc.transfer_id, desc, lease.block_ids))

    def release(self, transfer_id: str) -> bool:
        lease = self.leases.get(transfer_id)
        if lease is None or lease.is_sending:
            return False
        self._drop(transfer_id)
        return True

    def on_transfer_results(self, results: list[InstanceTransferResult]) -> None:
        for result in results:
            if result.transfer_id in self.leases:
                if not result.ok:
                    logger.warning("KV send %s failed: %s", result.transfer_id, result.error)
                self._drop(result.transfer_id)

    def abort(self, request_id: str) -> bool:
        transfer_id = self._by_request.get(request_id)
        if transfer_id is not None:
            return self.release(transfer_id)
        return self.engine.abort(request_id)

    def _drop(self, transfer_id: str) -> None:
        lease = self.leases.pop(transfer_id)
        self._by_request.pop(lease.request_id, None)
        self.engine.finish(lease.request_id, RequestStatus.FINISHED_STOPPED)


class DecodeRole(RoleHandler):
    def __init__(
        self,
        engine: LLMEngine,
        instance_id: str,
        ranks: tuple[int, ...],
        start_pull: Callable[[PullInfo, TransferDescriptor], None],
    ) -> None:
        super().__init__(engine)
        assert isinstance(engine.scheduler, DecodeScheduler)
        self.scheduler: DecodeScheduler = engine.scheduler
        self.instance_id = instance_id
        self.ranks = ranks
        self._start_pull = start_pull  # thread-safe: schedules the PullKV RPC on the asyncio side
        self._seq = SeqNoAllocator()
        self.pulls: dict[str, PullInfo] = {}  # request id -> where its KV is
        self._transfers: dict[str, str] = {}  # transfer id -> request id

    def add(self, request_id: str, info: PullInfo) -> None:
        self.pulls[request_id] = info

    def before_step(self) -> None:
        for req in self.scheduler.admit_for_transfer():
            info = self.pulls[req.request_id]
            desc = TransferDescriptor(
                transfer_id=info.transfer_id,
                seq_no=self._seq.next_seq_no(info.src_ranks),
                num_blocks=info.num_blocks,
                src_ranks=info.src_ranks,
                dst_ranks=self.ranks,
                spec=self.engine.kv_spec,
            )
            block_ids = self.engine.kv.block_ids(req.request_id)
            assert len(block_ids) == info.num_blocks
            self.engine.queue_transfer_op(TransferOp("recv", info.transfer_id, desc, block_ids))
            self._transfers[info.transfer_id] = req.request_id
            self._start_pull(info, desc)

    def pull_failed(self, transfer_id: str, error: str) -> None:
        """The prefill side refused or could not be reached: cancel our receives."""
        if transfer_id in self._transfers:
            logger.warning("pull %s failed: %s", transfer_id, error)
            self.engine.queue_transfer_op(TransferOp("cancel", transfer_id))

    def on_transfer_results(self, results: list[InstanceTransferResult]) -> None:
        assert self.loop is not None
        for result in results:
            request_id = self._transfers.pop(result.transfer_id, None)
            if request_id is None:
                continue
            self.pulls.pop(request_id, None)
            req = self.scheduler.transfer_done(request_id, result.ok)
            if req is not None and req.status is RequestStatus.RUNNING:
                stats = TransferStats(result.num_bytes, result.elapsed_s)
                self.loop.emit(request_id, StreamItem([], None, payload=stats))
                continue
            # The pull failed, or the request was aborted while it was in flight.
            self.engine.requests.pop(request_id, None)
            if not result.ok:
                self.loop.emit(
                    request_id, StreamItem([], "abort", error=f"KV transfer failed: {result.error}")
                )

    def abort(self, request_id: str) -> bool:
        req = self.engine.requests.get(request_id)
        if req is None:
            return False
        if req.status is RequestStatus.TRANSFERRING:
            # Its blocks are freed once every rank has reported the cancelled pull.
            self.engine.queue_transfer_op(TransferOp("cancel", self.pulls[request_id].transfer_id))
        else:
            self.pulls.pop(request_id, None)
        return self.engine.abort(request_id)
