"""The discrete-event loop: arrivals, the router's calls into the policy, steps, KV transfers.

Owns event order and the glue between instances and the routing policy; the policy object is
the same one the live router drives, called through the same interface (``policies/base.py``):

    arrival ──choose_prefill──▶ prefill inst. ──step…step──▶ first token ──on_prefill_done──▶
    choose_decode ──▶ decode inst. (waits for blocks) ──KV transfer──▶ decode steps ──▶ on_finished

Instance prefix-cache events reach the policy (``on_blocks_stored`` / ``on_blocks_evicted``) as
soon as they happen. Events at the same instant run completions first, then stage frees, then
arrivals, each group in creation order, so a run is deterministic.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from distserve.bench.workloads import WorkloadRequest
from distserve.router.policies import RouteRequest, RoutingPolicy, make_policy
from placement.latency_model import kv_transfer_s
from placement.simulator.instance import SimInstance, StepPlan
from placement.simulator.request import SimRequest
from placement.simulator.result import SimResult
from placement.simulator.spec import ClusterSpec

# event kinds; arrivals sort after all of them
_PULL_ARRIVES, _STEP_DONE, _TRANSFER_DONE, _STAGE_FREE = -1, 0, 1, 2


def route_request(w: WorkloadRequest, expected_output_tokens: int | None = None) -> RouteRequest:
    """The router's view of a workload request (block hashes chained like the engine's)."""
    return RouteRequest(
        request_id=w.request_id,
        client_id=w.client_id,
        num_prompt_tokens=w.input_len,
        block_hashes=w.chained_hashes(),
        block_size=w.block_size,
        expected_output_tokens=expected_output_tokens or w.output_len,
        arrival_s=w.arrival_s,
    )


class _Sim:
    def __init__(
        self,
        cluster: ClusterSpec,
        policy: RoutingPolicy,
        block_size: int,
        trace: list[tuple[str, tuple[Any, ...], Any]] | None,
        prefix_caching: bool = True,
    ) -> None:
        self.cluster = cluster
        self.policy = policy
        self.trace = trace
        self.instances = {
            s.instance_id: SimInstance(s, block_size, prefix_caching) for s in cluster.instances
        }
        self.front = [i for i in self.instances.values() if i.role != "decode"]
        self.back = [i for i in self.instances.values() if i.role == "decode"]
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.done: list[SimRequest] = []
        self.rejected: list[str] = []
        self.decision_s: list[float] = []
        self.min_capacity = min(i.pool.capacity_blocks for i in self.instances.values())
        self.between_steps = cluster.pulls_between_steps
        for inst in self.instances.values():
            policy.add_instance(inst.instance_id, inst.role, inst.pool.capacity_blocks)
        # the policy's entry points, called directly unless every call is traced
        self.choose_prefill = self._traced("choose_prefill")
        self.choose_decode = self._traced("choose_decode")
        self.on_prefill_done = self._traced("on_prefill_done")
        self.on_finished = self._traced("on_finished")

    def push(self, t: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, payload))

    def _traced(self, method: str) -> Callable[..., Any]:
        bound = getattr(self.policy, method)
        if self.trace is None:
            return bound  # type: ignore[no-any-return]
        return lambda *args: self.call(method, *args)

    def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.policy, method)(*args)
        if self.trace is not None:
            self.trace.append((method, args, result))
        return result

    def run(self, requests: Sequence[SimRequest]) -> float:
        # Arrivals come from a list sorted by time (stable: ties keep their order) instead of the
        # heap; an arrival runs before the heap's next event only when it is strictly earlier,
        # which is the order "completions, then stage frees, then arrivals" at equal times.
        arrivals = sorted(requests, key=lambda r: r.w.arrival_s)
        times = [r.w.arrival_s for r in arrivals]
        times.append(math.inf)
        events, pop, push = self.events, heapq.heappop, heapq.heappush
        arrive, step_done, transfer_done, kick = (
            self.arrive,
            self.step_done,
            self.transfer_done,
            self.kick,
        )
        now, i, num_arrivals = 0.0, 0, len(arrivals)
        while i < num_arrivals or events:
            if not events or times[i] < events[0][0]:
                now = times[i]
                arrive(arrivals[i], now)
                i += 1
                continue
            now, kind, _, payload = pop(events)
            if kind == _STEP_DONE:
                inst = payload[0]
                if (
                    inst.role == "decode"
                    and not (self.between_steps and inst.pending)
                    and inst.continue_decoding(payload[1])
                ):
                    self.seq += 1  # what step_done → kick would push, in the same order
                    push(events, (now + payload[1].latency_s, _STEP_DONE, self.seq, payload))
                else:
                    step_done(inst, payload[1], now)
            elif kind == _TRANSFER_DONE:
                transfer_done(payload, now)
            elif kind == _PULL_ARRIVES:
                self.pull_arrives(payload, now)
            else:
                payload.stage_free()
                kick(payload, now)
        return now

    # ---- handlers --------------------------------------------------------------------------
    def arrive(self, r: SimRequest, now: float) -> None:
        fronts = self.front
        if r.num_total_blocks > self.min_capacity:  # some instance may be too small for it
            fronts = [i for i in self.front if i.blocks_needed(r) <= i.pool.capacity_blocks]
            if not fronts or (self.back and not any(self._fits_back(i, r) for i in self.back)):
                self.rejected.append(r.w.request_id)
                return
        loads = [i.snapshot() for i in fronts]
        t0 = time.perf_counter()
        iid = self.choose_prefill(r.route, loads, now)
        self.decision_s.append(time.perf_counter() - t0)
        inst = self.instances[iid]
        inst.enqueue_prefill(r)
        self.kick(inst, now)

    @staticmethod
    def _fits_back(inst: SimInstance, r: SimRequest) -> bool:
        return inst.blocks_needed(r) <= inst.pool.capacity_blocks

    def kick(self, inst: SimInstance, now: float) -> None:
        plan = inst.try_start_step(now)
        self.flush(inst, now)
        if plan is None:
            return
        self.push(now + plan.latency_s, _STEP_DONE, (inst, plan))
        if plan.stage_s < plan.latency_s:
            self.push(now + plan.stage_s, _STAGE_FREE, inst)

    def step_done(self, inst: SimInstance, plan: StepPlan, now: float) -> None:
        prefilled, finished = inst.finish_step(plan)
        self.flush(inst, now)
        if inst.deferred_pulls:  # served between this step and the next
            pulls, inst.deferred_pulls = inst.deferred_pulls, []
            for r in pulls:
                self.start_transfer(r, now)
        for r in prefilled:
            r.first_token_s = now
            self.on_prefill_done(r.w.request_id, now, now - r.w.arrival_s)
            if inst.role != "prefill":
                continue
            if r.output_len == 1:
                inst.release_lease(r)
                self.flush(inst, now)
                self.finish(r, now)
                continue
            backs = self.back
            if r.num_total_blocks > self.min_capacity:
                backs = [i for i in self.back if self._fits_back(i, r)]
            loads = [i.snapshot() for i in backs]
            decode = self.instances[self.choose_decode(r.route, loads, now)]
            decode.enqueue_decode(r)
            self.admit_decode(decode, now)
        for r in finished:
            self.finish(r, now)
        if inst.role == "decode" and (finished or (self.between_steps and inst.pending)):
            self.admit_decode(inst, now)
        self.kick(inst, now)

    def admit_decode(self, decode: SimInstance, now: float) -> None:
        if self.between_steps:
            if decode.is_busy:
                return  # admitted when its step ends (step_done)
            rtt = self.cluster.pull_rtt_s
            for r in decode.admit_pending():
                if rtt > 0:
                    self.push(now + rtt, _PULL_ARRIVES, r)
                else:
                    self.pull_arrives(r, now)
            return
        for r in decode.admit_pending():
            self.start_transfer(r, now)

    def pull_arrives(self, r: SimRequest, now: float) -> None:
        """Our engine: the pull reaches the prefill instance, which serves it between steps."""
        prefill = self.instances[r.prefill_id]
        if prefill.is_busy:
            prefill.deferred_pulls.append(r)
        else:
            self.start_transfer(r, now)

    def start_transfer(self, r: SimRequest, now: float) -> None:
        dt = kv_transfer_s(
            r.prompt_len,
            self.cluster.kv_bytes_per_token,
            self.cluster.transfer_bandwidth_bytes_per_s,
        )
        self.push(now + dt, _TRANSFER_DONE, r)

    def transfer_done(self, r: SimRequest, now: float) -> None:
        prefill = self.instances[r.prefill_id]
        prefill.release_lease(r)
        self.flush(prefill, now)
        self.kick(prefill, now)
        decode = self.instances[r.decode_id]
        decode.on_transfer_done(r)
        self.kick(decode, now)

    def finish(self, r: SimRequest, now: float) -> None:
        r.finish_s = now
        if not r.decode_id:
            r.decode_id = r.prefill_id
        self.done.append(r)
        self.on_finished(r.w.request_id, now)

    def flush(self, inst: SimInstance, now: float) -> None:
        pool = inst.pool
        if pool.evicted:
            evicted, pool.evicted = pool.evicted, []
            self.call("on_blocks_evicted", inst.instance_id, tuple(evicted))
        if pool.stored:
            stored, pool.stored = pool.stored, []
            self.call("on_blocks_stored", inst.instance_id, tuple(stored), now)


def simulate(
    cluster: ClusterSpec,
    requests: Sequence[WorkloadRequest],
    policy: RoutingPolicy | str,
    *,
    expected_output: Callable[[WorkloadRequest], int] | None = None,
    trace: list[tuple[str, tuple[Any, ...], Any]] | None = None,
) -> SimResult:
    """Run ``requests`` through ``cluster`` routed by ``policy`` (an object, or a registry name).

    ``expected_output`` estimates each request's output length for the policy (default: the true
    length, as if ``max_tokens`` were exact). ``trace``, when given, receives every policy call
    as ``(method, args, result)``. Requests that can never fit an instance's KV are rejected, not run.
    """
    if isinstance(policy, str):
        policy = make_policy(policy)
    block_sizes = {w.block_size for w in requests}
    if len(block_sizes) > 1:
        raise ValueError(f"all requests must share one block size, got {sorted(block_sizes)}")
    reqs = [
        SimRequest(w, route_request(w, expected_output(w) if expected_output else None))
        for w in requests
    ]
    caching = trace is not None or _listens_to_cache(policy) or _shares_blocks(reqs)
    sim = _Sim(cluster, policy, block_sizes.pop() if block_sizes else 16, trace, caching)
    end_s = sim.run(reqs)
    for inst in sim.instances.values():
        inst.pool.check_consistency()
        assert not inst.waiting and not inst.prefilling and not inst.num_decoding, (
            f"{inst.instance_id} stuck"
        )
    return SimResult(
        records=tuple(r.record() for r in sim.done),
        rejected=tuple(sim.rejected),
        decision_s=tuple(sim.decision_s),
        busy_s={i.instance_id: i.busy_s for i in sim.instances.values()},
        roles={i.instance_id: i.role for i in sim.instances.values()},
        num_gpus=cluster.num_gpus,
        end_s=end_s,
    )


def _listens_to_cache(policy: RoutingPolicy) -> bool:
    """Whether the policy overrides a prefix-cache event hook."""
    cls = type(policy)
    return (
        cls.on_blocks_stored is not RoutingPolicy.on_blocks_stored
        or cls.on_blocks_evicted is not RoutingPolicy.on_blocks_evicted
    )


def _shares_blocks(reqs: Sequence[SimRequest]) -> bool:
    """Whether some block hash occurs in two requests. When none does, no prompt can ever hit
    a prefix cache, and a pool with caching off gives the same free-block counts (unreferenced
    cached blocks count as free) without tracking every block: unless the policy or a trace
    observes the cache events, the run is identical, only faster."""
    seen: set[int] = set()
    total = 0
    for r in reqs:
        seen.update(r.hashes)
        total += len(r.hashes)
        if len(seen) < total:
            return True
    return False
