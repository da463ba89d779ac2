"""Which requests run in the next step, and with how many new tokens each.

One rule covers prefill, chunked prefill, decode and recompute after preemption: a scheduled
request computes ``min(num_tokens - num_computed_tokens, budget left)`` tokens, and samples
the next token when that reaches the end of its known tokens. Running requests go first (a
decode costs one token of the budget), then waiting ones in admission order (Sarathi-style
chunked prefill, ALGORITHMS.md §5).

When the KV pool runs dry for a running request, the most recently admitted running request
is preempted: its blocks are freed and it goes back to the head of the queue, to be recomputed
(prompt + the tokens it had generated) when there is room again.

The scheduler owns the waiting queue and the running list; it does not run the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distserve.engine.admission import (
    AdmissionOrder,
    WaitingItem,
    available_admission_orders,
    make_admission_order,
)
from distserve.engine.kv_manager import KVCacheManager
from distserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 128  # requests running at once, at most
    admission: str = "fcfs"  # order waiting requests are tried in (distserve.engine.admission)
    admission_options: dict[str, object] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.admission not in available_admission_orders():
            raise ValueError(
                f"admission must be one of {available_admission_orders()}, got {self.admission!r}"
            )
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass
class ScheduledBatch:
    """One step's work, in the order the model runner lays the tokens out."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per request, >= 1
    preempted: list[Request] = field(default_factory=list)  # requests sent back to the queue

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether request ``i`` reaches the end of its known tokens (and so samples) this step."""
        req = self.requests[i]
        return req.num_computed_tokens + self.num_new_tokens[i] == req.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: dict[str, Request] = {}  # in arrival order; tried in the admission order
        self.admission: AdmissionOrder = make_admission_order(
            config.admission, **config.admission_options
        )
        self.running: list[Request] = []
        self.num_preemptions_total = 0

    # ---- queue management ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting[request.request_id] = request
        self.admission.add(_waiting_item(request))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request wherever it is and free its blocks."""
        assert status.is_finished
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            del self.waiting[request.request_id]
            self.admission.remove(request.request_id)
        else:
            return
        request.status = status
        self.kv.free(request.request_id)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1

        # New work only when nothing had to be preempted: the pool is under pressure otherwise.
        if not self.waiting or budget <= 0 or batch.preempted:
            return batch
        hits: dict[str, list] = {}

        def match_len(request_id: str) -> int:
            if request_id not in hits:
                hits[request_id] = self.kv.find_cached_prefix(self.waiting[request_id])
            return len(hits[request_id]) * self.kv.block_size

        for request_id in self.admission.order(match_len):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            req = self.waiting[request_id]
            num_cached_tokens = match_len(request_id)
            num_new = min(req.num_tokens - num_cached_tokens, budget)
            req.num_computed_tokens = num_cached_tokens
            if not self.kv.allocate(req, num_new, hits[request_id]):
                req.num_computed_tokens = 0
                break
            del self.waiting[request_id]
            self.admission.on_admitted(request_id, req.num_tokens - num_cached_tokens)
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached_tokens
                self.kv.record_lookup(req.num_prompt_tokens, num_cached_tokens)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Request]:
        """Advance the batch's requests by what the step computed; returns those that finished.

        ``sampled[i]`` is the token sampled for request ``i``, or None when it did not sample
        (a prompt chunk that is not its last).
        """
        finished = []
        for req, num_new, token_id in zip(batch.requests, batch.num_new_tokens, sampled):
            req.num_computed_tokens += num_new
            self.kv.cache_computed_blocks(req)
            if token_id is None:
                continue
            req.output_token_ids.append(token_id)
            self.admission.on_output_tokens(req.client_id, 1)
            status = req.check_stop(token_id)
            if status is not None:
                self.finish(req, status)
                finished.append(req)
        return finished

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting[req.request_id] = req
        self.admission.add(_waiting_item(req), is_resumed=True)


def _waiting_item(req: Request) -> WaitingItem:
    return WaitingItem(req.request_id, req.client_id, req.arrival_s, req.num_prompt_tokens)
