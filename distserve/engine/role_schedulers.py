"""The prefill and decode roles, as small variations of the colocated :class:`Scheduler`.

Prefill role: a request leaves the batch as soon as its first token is sampled. Its blocks stay
held under a *lease* (status PREFILLED) until the decode side has pulled them or the lease is
dropped; the driver (``distserve.instance``) owns lease ids and expiry.

Decode role: a request arrives with its prompt and first token, its KV still on a prefill
instance. It waits (AWAITING_KV) until the pool has room for it plus headroom for the running
batch — decode memory is the back-pressure of the whole pipeline — then gets its blocks and
waits for the pull (TRANSFERRING), then joins the batch with ``num_computed_tokens`` equal to
the prompt length. A preempted decode request is recomputed locally like any other.
"""

from __future__ import annotations

from collections import deque

from distserve.engine.kv_manager import KVCacheManager
from distserve.engine.request import Request, RequestStatus
from distserve.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig


class PrefillScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        super().__init__(config, kv)
        self.leased: dict[str, Request] = {}

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Request]:
        finished = super().update(batch, sampled)
        for req, token_id in zip(batch.requests, sampled):
            if token_id is not None and req.status is RequestStatus.RUNNING:
                self.running.remove(req)
                req.status = RequestStatus.PREFILLED
                self.leased[req.request_id] = req
        return finished

    @property
    def num_leased_blocks(self) -> int:
        return sum(len(self.kv.blocks(rid)) for rid in self.leased)

    def finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.PREFILLED:
            del self.leased[request.request_id]
            request.status = status
            self.kv.free(request.request_id)
            return
        super().finish(request, status)


class DecodeScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        super().__init__(config, kv)
        self.awaiting_kv: deque[Request] = deque()
        self.transferring: dict[str, Request] = {}

    def add_awaiting_kv(self, request: Request) -> None:
        """A request whose prompt KV sits on a prefill instance (first token already sampled)."""
        assert request.num_output_tokens == 1 and request.num_computed_tokens == 0
        request.status = RequestStatus.AWAITING_KV
        self.awaiting_kv.append(request)

    def admit_for_transfer(self) -> list[Request]:
        """Give blocks to the requests at the head of the queue while there is room."""
        admitted = []
        while self.awaiting_kv:
            if len(self.running) + len(self.transferring) >= self.config.max_num_seqs:
                break
            req = self.awaiting_kv[0]
            need = self.kv.num_blocks_needed(req.num_prompt_tokens)
            headroom = len(
                self.running
            )  # one block per running request, to grow without preempting
            if need > self.kv.num_free_blocks - headroom:
                break
            assert self.kv.allocate(req, req.num_prompt_tokens)
            self.awaiting_kv.popleft()
            req.status = RequestStatus.TRANSFERRING
            self.transferring[req.request_id] = req
            admitted.append(req)
        return admitted

    def transfer_done(self, request_id: str, ok: bool) -> Request | None:
        """The pull ended; on success the request joins the batch, else its blocks are freed."""
        req = self.transferring.pop(request_id, None)
        if req is None:
            return None
        if not ok or req.is_finished:  # failed, or aborted while the pull was in flight
            self.kv.free(request_id)
            if not req.is_finished:
                req.status = RequestStatus.FINISHED_ABORTED
            return req
        req.num_computed_tokens = req.num_prompt_tokens
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return req

    def has_work(self) -> bool:
        return super().has_work() or bool(self.awaiting_kv or self.transferring)

    def finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.AWAITING_KV:
            self.awaiting_kv.remove(request)
            request.status = status
        elif request.status is RequestStatus.TRANSFERRING:
            # Blocks are freed by transfer_done once every rank reported the cancelled pull.
            request.status = status
        else:
            super().finish(request, status)


SCHEDULERS: dict[str, type[Scheduler]] = {
    "colocated": Scheduler,
    "prefill": PrefillScheduler,
    "decode": DecodeScheduler,
}
