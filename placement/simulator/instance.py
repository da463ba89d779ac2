"""One simulated instance: its queues, KV pool and what each step runs.

Owns step composition for the three roles and the KV pool's use; timing comes from the
instance's :class:`LatencyModel`, routing and event order from ``core.py``.

- **prefill**: running prompts continue first, then new prompts in the admission order, chunked
  to ``max_prefill_tokens`` per step; a finished prompt keeps its blocks (the lease) until its KV
  has been pulled by a decode instance. With pp > 1 a new batch may enter stage 1 every stage
  time; a batch takes pp stage times.
- **decode**: requests whose prefill is done wait FIFO until their prompt + output blocks fit,
  are pulled (KV transfer), then join the continuous batch (at most ``max_batch_size``).
- **colocated** (Sarathi-style): every running decode takes one token of the budget, then
  prompts continue, then new prompts are admitted; blocks for prompt + output are reserved at
  admission, so nothing is ever preempted.

Cached prefix blocks are never recomputed; a prompt that is entirely cached still computes its
last token.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from distserve.engine.admission import WaitingItem, make_admission_order
from distserve.router.policies.base import InstanceLoad
from placement.simulator.kv_pool import KVPool
from placement.simulator.request import SimRequest
from placement.simulator.spec import InstanceSpec


@dataclass(slots=True)
class StepPlan:
    """One batch in flight: prompt chunks and the number of decode tokens."""

    chunks: list[tuple[SimRequest, int]] = field(default_factory=list)
    decodes: int = 0
    stage_s: float = 0.0  # how long stage 1 is busy
    latency_s: float = 0.0  # until the batch's results are out


class SimInstance:
    def __init__(self, spec: InstanceSpec, block_size: int, prefix_caching: bool = True) -> None:
        """``prefix_caching`` False turns the cache off whatever the spec says (the simulator
        does so when no two prompts share a block, see ``core.simulate``)."""
        self.spec = spec
        self.instance_id = spec.instance_id
        self.role = spec.role
        self.block_size = block_size
        self.latency = spec.latency
        self.pool = KVPool(
            spec.kv_capacity_tokens // block_size,
            prefix_caching and spec.prefix_caching and spec.role != "decode",
        )
        self.admission = (
            make_admission_order(spec.admission, **dict(spec.admission_options))
            if spec.role != "decode"
            else None
        )
        self.waiting: dict[str, SimRequest] = {}
        self.num_waiting_tokens = 0
        self.prefilling: list[SimRequest] = []
        self.pending: deque[SimRequest] = deque()  # decode: waiting for memory
        self.num_transferring = 0
        self.deferred_pulls: list[SimRequest] = []  # prefill: pulls that wait for the step's end
        self.joining: list[SimRequest] = []
        self._decoding: list[tuple[int, int, SimRequest]] = []  # (last step, seq, request) heap
        self._seq = 0
        self.num_steps = 0
        self.sum_ctx = 0  # Σ(context + 1) over decoding requests
        self.is_busy = False
        self.busy_s = 0.0
        self.recent_tpot_s: float | None = None
        self._snapshot: InstanceLoad | None = None
        lat = self.latency
        # decode_step_latency_ms inlined for pp = 1 (the hot path): the same arithmetic
        self._decode_fit = (
            (lat.large_batch_threshold, lat.decode_small, lat.decode_large) if lat.pp == 1 else None
        )

    # ---- routing view ----------------------------------------------------------------------
    @property
    def num_decoding(self) -> int:
        return len(self._decoding)

    def snapshot(self) -> InstanceLoad:
        snap = self._snapshot
        if snap is None:
            # built per instance per decision: fill the frozen dataclass's fields directly
            # (its __init__ and role check cost more than the rest; the role was checked by
            # InstanceSpec)
            snap = self._snapshot = object.__new__(InstanceLoad)
            snap.__dict__.update(
                instance_id=self.instance_id,
                role=self.role,
                num_running=len(self.prefilling) + len(self._decoding) + len(self.joining),
                num_waiting=len(self.waiting) + len(self.pending),
                num_waiting_tokens=self.num_waiting_tokens,
                free_kv_blocks=self.pool.num_free,
                total_kv_blocks=self.pool.capacity_blocks,
                recent_tpot_s=self.recent_tpot_s,
            )
        return snap

    def blocks_needed(self, r: SimRequest) -> int:
        """Blocks ``r`` holds here: its prompt on a prefill instance, prompt + output otherwise."""
        return r.num_prompt_blocks if self.role == "prefill" else r.num_total_blocks

    # ---- prefill side ----------------------------------------------------------------------
    def enqueue_prefill(self, r: SimRequest) -> None:
        assert self.admission is not None
        self._snapshot = None
        r.prefill_id = self.instance_id
        self.waiting[r.w.request_id] = r
        self.num_waiting_tokens += r.prompt_len
        self.admission.add(WaitingItem(r.w.request_id, r.w.client_id, r.w.arrival_s, r.prompt_len))

    def _match_len(self, request_id: str) -> int:
        return self.pool.match(self.waiting[request_id].hashes) * self.block_size

    def _admit(self, r: SimRequest, now_s: float) -> bool:
        m = self.pool.match(r.hashes)
        private = self.blocks_needed(r) - m
        if not self.pool.allocate(r.hashes, m, private):
            return False
        cached = min(m * self.block_size, r.prompt_len - 1)
        r.num_cached_blocks, r.num_cached_tokens = m, cached
        r.num_computed = r.num_scheduled = cached
        r.prefill_private_blocks = private
        r.prefill_admit_s = now_s
        assert self.admission is not None
        self.admission.on_admitted(r.w.request_id, r.prompt_len - cached)
        del self.waiting[r.w.request_id]
        self.num_waiting_tokens -= r.prompt_len
        self.prefilling.append(r)
        return True

    # ---- steps -----------------------------------------------------------------------------
    def try_start_step(self, now_s: float) -> StepPlan | None:
        """Compose the next batch, if there is work; marks the instance busy."""
        if self.is_busy:
            return None
        budget = self.spec.max_prefill_tokens
        decodes = 0
        if self.role != "prefill":
            if self.joining:
                for r in self.joining:
                    self._join(r)
                self.joining.clear()
            decodes = len(self._decoding)
            budget -= decodes
        chunks: list[tuple[SimRequest, int]] = []
        for r in self.prefilling:
            n = min(r.prompt_len - r.num_scheduled, budget)
            if n > 0:
                chunks.append((r, n))
                budget -= n
        if budget > 0 and self.waiting:
            assert self.admission is not None
            for rid in self.admission.order(self._match_len):
                if budget <= 0 or self.num_running >= self.spec.max_batch_size:
                    break
                r = self.waiting[rid]
                if not self._admit(r, now_s):
                    break
                n = min(r.prompt_len - r.num_scheduled, budget)
                chunks.append((r, n))
                budget -= n
        if not chunks and not decodes:
            return None
        for r, n in chunks:
            r.num_scheduled += n
        plan = StepPlan(chunks, decodes)
        self._time(plan)
        self.is_busy = True
        self._snapshot = None
        return plan

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self._decoding)

    def _time(self, plan: StepPlan) -> None:
        lat = self.latency
        work_ms: float = 0
        if plan.chunks:
            work_ms = sum(lat.extend_work_ms(n, r.num_scheduled - n) for r, n in plan.chunks)
        if self.role == "prefill":
            work_ms += lat.prefill[0]
            plan.stage_s = lat.prefill_stage_ms(work_ms) / 1000
            plan.latency_s = lat.prefill_batch_latency_ms(work_ms) / 1000
        else:
            work_ms += self._decode_ms(plan.decodes) if plan.decodes else lat.prefill[0]
            plan.stage_s = plan.latency_s = work_ms / 1000
        self.busy_s += plan.stage_s

    def _decode_ms(self, batch: int) -> float:
        fit = self._decode_fit
        if fit is None:
            return self.latency.decode_step_latency_ms(batch, self.sum_ctx)
        a, b, c = fit[1] if batch <= fit[0] else fit[2]
        return a + b * self.sum_ctx + c * batch

    def continue_decoding(self, plan: StepPlan) -> bool:
        """Decode instance, at the end of ``plan``'s step: when no request finishes with it and
        none waits to join, apply the step and start the next one in ``plan`` (True); the same
        state as ``finish_step`` then ``try_start_step``, without building new lists.
        Otherwise change nothing (False)."""
        decoding = self._decoding
        steps = self.num_steps + 1
        if self.joining or decoding[0][0] <= steps:
            return False
        self.num_steps = steps
        self.sum_ctx += plan.decodes  # == len(decoding): nothing joined or left
        self.recent_tpot_s = plan.latency_s
        plan.stage_s = plan.latency_s = self._decode_ms(plan.decodes) / 1000
        self.busy_s += plan.stage_s
        self._snapshot = None
        return True

    def finish_step(self, plan: StepPlan) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply a finished batch: returns (prompts that got their first token, finished)."""
        self._snapshot = None
        if self.latency.pp == 1 or not self.latency.micro_batched or self.role != "prefill":
            self.is_busy = False
        prefilled: list[SimRequest] = []
        caching = self.pool.enable_prefix_caching
        for r, n in plan.chunks:
            r.num_computed += n
            if r.num_computed == r.prompt_len:
                prefilled.append(r)
                if caching:  # without caching, commit keeps the blocks private: nothing to do
                    self.pool.commit(r.hashes[r.num_cached_blocks :])
                r.prefill_private_blocks -= len(r.hashes) - r.num_cached_blocks
        if prefilled:
            done = {id(r) for r in prefilled}
            self.prefilling = [r for r in self.prefilling if id(r) not in done]
        finished: list[SimRequest] = []
        if plan.decodes:
            decoding = self._decoding
            steps = self.num_steps = self.num_steps + 1
            self.sum_ctx += len(decoding)
            self.recent_tpot_s = plan.latency_s
            while decoding and decoding[0][0] <= steps:
                r = heapq.heappop(decoding)[2]
                self.sum_ctx -= r.prompt_len + r.output_len
                self._release_decode(r)
                finished.append(r)
        if self.role == "colocated":
            for r in prefilled:
                if r.output_len > 1:
                    self.joining.append(r)
                else:
                    self._release_decode(r)
                    finished.append(r)
        return prefilled, finished

    def stage_free(self) -> None:
        """pp > 1 prefill: stage 1 is free for the next batch."""
        self.is_busy = False

    # ---- decode side -----------------------------------------------------------------------
    def enqueue_decode(self, r: SimRequest) -> None:
        self._snapshot = None
        r.decode_id = self.instance_id
        self.pending.append(r)

    def admit_pending(self) -> list[SimRequest]:
        """Requests that now get their blocks and start pulling their KV (FIFO)."""
        started = []
        while (
            self.pending
            and len(self._decoding) + len(self.joining) + self.num_transferring
            < self.spec.max_batch_size
        ):
            r = self.pending[0]
            if not self.pool.allocate((), 0, self.blocks_needed(r)):
                break
            r.decode_private_blocks = self.blocks_needed(r)
            self.pending.popleft()
            self.num_transferring += 1
            started.append(r)
        if started:
            self._snapshot = None
        return started

    def on_transfer_done(self, r: SimRequest) -> None:
        self._snapshot = None
        self.num_transferring -= 1
        self.joining.append(r)

    def release_lease(self, r: SimRequest) -> None:
        """Prefill side: the KV was pulled (or is not needed); its blocks become cache."""
        self._snapshot = None
        self.pool.release(r.hashes, r.prefill_private_blocks)
        r.prefill_private_blocks = 0

    def _join(self, r: SimRequest) -> None:
        self.sum_ctx += r.prompt_len + 1
        self._seq += 1
        heapq.heappush(self._decoding, (self.num_steps + r.output_len - 1, self._seq, r))

    def _release_decode(self, r: SimRequest) -> None:
        if self.role == "colocated":
            self.pool.release(r.hashes, r.prefill_private_blocks)
            r.prefill_private_blocks = 0
        else:
            self.pool.release((), r.decode_private_blocks)
            r.decode_private_blocks = 0
