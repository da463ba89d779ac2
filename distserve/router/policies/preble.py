"""``preble``: Preble's E2 global scheduler, Preble-E2-like (ALGORITHMS.md §3), over block hashes.

Owns the E2 rule. Per request, in this order:

1. ``matched`` = tokens of the deepest prompt block some instance holds, ``missed`` = the rest.
2. **Exploit** if ``matched > missed`` (a tie explores): among the holders of that deepest block,
   the lowest load cost.
3. **Explore** otherwise: if some instance's windowed prefix hit ratio is >= ``explore_hit_ratio``
   (a detail of the released code), the lowest load cost among those; else the lowest
   ``load cost + eviction cost`` over all instances.
4. Record the assignment on every block of the path (dispatch time), charge the load, rebalance.

*Nodes over block hashes.* The hashes form a trie (one block per node, see ``PrefixIndex``); the
radix-tree node of a prompt's path is a maximal run of blocks between branch points (a block
with more than one child ends a node; the prompt's last block ends its last node). A node is
*important* when it is longer than all of its ancestors together (``end − start > start``, in
blocks); at most log2(blocks) per path. A node is named by the hash of its first block.

*Load cost* of instance g = Σ over the window of charges on g (``preble_load``) + in-flight cost:
for a colocated instance ``expected output × recent TPOT`` per request in flight (Preble's decode
cost); for a prefill-only instance (disaggregation: our adaptation) the pending
``PrefillTime(uncached, cached)`` of each request dispatched there and not yet prefilled.
*Eviction cost*: if the request's uncached blocks exceed g's free blocks, walk g's LRU blocks
(skipping the request's own path) as an LRU eviction would and add, per evicted block,
``hits in the window × its marginal prefill time`` (hits = requests through it − 1).

*Rebalancing* (after ``warmup_requests_per_instance × instances`` dispatches): while the busiest
instance's load >= ``rebalance_ratio`` × the lightest's, move its cheapest hot nodes (>=
``hot_min_requests`` requests in the window) to the lightest while that does not overshoot, then
the next pair. Moving re-points the index (the lightest is recorded as holding the node's path,
the busiest no longer holds the node) and moves the node's charges. If exactly one hot node exists
and its mean TTFT over the newer half of the window is >= ``replicate_ttft_ratio`` × the older
half's, it is **replicated** to the lightest instance (recorded as a holder; no KV is copied).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from distserve.router.policies.base import InstanceLoad, RouteRequest, register_policy
from distserve.router.policies.preble_load import PrefillTimeModel, WindowedLoad
from distserve.router.policies.prefix_aware import PrefixAwarePolicy


@dataclass
class _InFlight:
    instance_id: str
    prefill_s: float  # counted while the prefill is pending (prefill-only instances)
    output_tokens: int  # counted until finished (colocated instances)
    important_nodes: tuple[int, ...]
    is_prefill_done: bool = False


@register_policy
class PreblePolicy(PrefixAwarePolicy):
    name = "preble"

    def __init__(
        self,
        window_s: float = 180.0,
        prefill_time: tuple[float, float, float, float] = (0.0181, 1.02e-4, 0.0, 1.42e-8),
        rebalance_ratio: float = 1.5,
        warmup_requests_per_instance: int = 50,
        hot_min_requests: int = 2,
        replicate_ttft_ratio: float = 2.0,
        explore_hit_ratio: float | None = 0.7,
        default_tpot_s: float = 0.05,
    ) -> None:
        super().__init__(window_s=window_s)
        if rebalance_ratio <= 1.0:
            raise ValueError(f"rebalance_ratio must be > 1, got {rebalance_ratio}")
        self.prefill_time = PrefillTimeModel(*prefill_time)
        self.rebalance_ratio = rebalance_ratio
        self.warmup_requests_per_instance = warmup_requests_per_instance
        self.replicate_ttft_ratio = replicate_ttft_ratio
        self.explore_hit_ratio = explore_hit_ratio
        self.default_tpot_s = default_tpot_s
        self.load = WindowedLoad(window_s, hot_min_requests)
        self._num_routed = 0
        self._in_flight: dict[str, _InFlight] = {}
        self._prefill_s: dict[str, float] = {}  # instance -> pending prefill seconds
        self._output_tokens: dict[str, int] = {}  # instance -> expected output tokens in flight
        self._node_path: dict[
            int, tuple[tuple[int, ...], int, int]
        ] = {}  # node -> (path, start, end)
        self._ttft: dict[int, deque[tuple[float, float]]] = {}  # node -> (time, ttft) samples
        self.num_moves = 0
        self.num_replications = 0

    # ---- costs -----------------------------------------------------------------------------
    def load_cost(self, inst: InstanceLoad) -> float:
        iid = inst.instance_id
        tpot = inst.recent_tpot_s if inst.recent_tpot_s is not None else self.default_tpot_s
        in_flight = self._prefill_s.get(iid, 0.0) + self._output_tokens.get(iid, 0) * tpot
        return self.load.total(iid) + in_flight

    def eviction_cost(
        self, inst: InstanceLoad, req: RouteRequest, num_cached_blocks: int, now_s: float
    ) -> float:
        need = -(-req.num_prompt_tokens // req.block_size) - num_cached_blocks
        if inst.total_kv_blocks == 0 or need <= inst.free_kv_blocks:
            return 0.0
        to_evict = need - inst.free_kv_blocks
        on_path = set(req.block_hashes)
        per_block = self.prefill_time(req.block_size, 0) - self.prefill_time.a_s
        cost, evicted = 0.0, 0
        for h in self.index.lru_blocks(inst.instance_id):
            if h in on_path:
                continue
            cost += max(0, self.index.num_requests(h, now_s) - 1) * per_block
            evicted += 1
            if evicted >= to_evict:
                break
        return cost

    # ---- the decision ----------------------------------------------------------------------
    def select_prefill(
        self, req: RouteRequest, instances: Sequence[InstanceLoad], now_s: float
    ) -> str:
        self._ensure_known(instances)
        self.load.expire(now_s)
        hashes, bs = req.block_hashes, req.block_size
        depth = self.index.deepest_present(hashes)
        matched = min(depth * bs, req.num_prompt_tokens)
        cached = self.index.match(hashes)
        chosen: InstanceLoad | None = None
        if matched > req.num_prompt_tokens - matched:
            holders = self.index.holders(hashes[depth - 1])
            candidates = [i for i in instances if i.instance_id in holders]
            if candidates:
                chosen = min(candidates, key=self.load_cost)
        if chosen is None:
            chosen = self._explore(req, instances, cached, now_s)
        self._record(req, chosen, cached.get(chosen.instance_id, 0), now_s)
        self.rebalance(instances, now_s)
        return chosen.instance_id

    def _explore(
        self,
        req: RouteRequest,
        instances: Sequence[InstanceLoad],
        cached: dict[str, int],
        now_s: float,
    ) -> InstanceLoad:
        if self.explore_hit_ratio is not None:
            warm = [
                i
                for i in instances
                if (self.load.hit_ratio(i.instance_id) or 0.0) >= self.explore_hit_ratio
            ]
            if warm:
                return min(warm, key=self.load_cost)
        # lowest load + eviction cost; eviction cost >= 0, so stop once load alone cannot win
        ranked = sorted(enumerate(instances), key=lambda p: (self.load_cost(p[1]), p[0]))
        best: tuple[float, int] | None = None
        for pos, inst in ranked:
            load = self.load_cost(inst)
            if best is not None and load > best[0]:
                break
            total = load + self.eviction_cost(inst, req, cached.get(inst.instance_id, 0), now_s)
            if best is None or (total, pos) < best:
                best = (total, pos)
        assert best is not None
        return instances[best[1]]

    def _record(
        self, req: RouteRequest, inst: InstanceLoad, num_cached_blocks: int, now_s: float
    ) -> None:
        iid, hashes, bs, n = (
            inst.instance_id,
            req.block_hashes,
            req.block_size,
            req.num_prompt_tokens,
        )
        self.index.insert(iid, hashes, now_s)
        self.index.record_request(hashes, now_s)
        important: list[int] = []
        start = 0
        for i, h in enumerate(hashes):
            if i + 1 < len(hashes) and not self.index.is_branch(h):
                continue
            end = i + 1  # node = blocks [start, end)
            if end - start > start:
                node = hashes[start]
                first_missed = max(start, num_cached_blocks)
                extend = (n if end == len(hashes) else end * bs) - first_missed * bs
                cost = self.prefill_time(extend, first_missed * bs) if first_missed < end else 0.0
                self.load.charge(now_s, iid, node, cost / max(1, len(self.index.holders(node))))
                self._node_path[node] = (hashes, start, end)
                important.append(node)
            start = end
        cached_tokens = min(num_cached_blocks * bs, n)
        self.load.record_hit(now_s, iid, cached_tokens, n)
        flight = _InFlight(iid, 0.0, 0, tuple(important))
        if inst.role == "colocated":
            flight.output_tokens = req.expected_output_tokens
            self._output_tokens[iid] = self._output_tokens.get(iid, 0) + flight.output_tokens
        else:
            flight.prefill_s = self.prefill_time(n - cached_tokens, cached_tokens)
            self._prefill_s[iid] = self._prefill_s.get(iid, 0.0) + flight.prefill_s
        self._in_flight[req.request_id] = flight
        self._num_routed += 1
        if self._num_routed % 1024 == 0:  # forget nodes that left the window
            for node in [v for v in self._node_path if not self.load.num_requests(v)]:
                del self._node_path[node]
                self._ttft.pop(node, None)

    # ---- rebalancing -----------------------------------------------------------------------
    def rebalance(self, instances: Sequence[InstanceLoad], now_s: float) -> None:
        """Move or replicate hot prefixes (runs after every dispatch; callable directly)."""
        self._ensure_known(instances)
        if (
            self._num_routed < self.warmup_requests_per_instance * len(instances)
            or len(instances) < 2
        ):
            return
        loads = {i.instance_id: self.load_cost(i) for i in instances}
        order = sorted(loads, key=lambda iid: loads[iid])
        lo, hi = 0, len(order) - 1
        while lo < hi:
            busy, light = order[hi], order[lo]
            if loads[busy] <= 0 or loads[busy] < self.rebalance_ratio * loads[light]:
                break
            for cost, node in sorted(self.load.hot_nodes(busy)):
                if cost <= 0:
                    continue
                if loads[busy] - cost < loads[light] + cost:
                    break
                self._move(node, busy, light, now_s)
                loads[busy] -= cost
                loads[light] += cost
            lo, hi = lo + 1, hi - 1
        if self.load.num_hot_nodes == 1:
            self._maybe_replicate(self.load.the_hot_node(), order[0], now_s)

    def _move(self, node: int, src: str, dst: str, now_s: float) -> None:
        path, start, end = self._node_path[node]
        self.load.move(node, src, dst)
        self.index.blocks_evicted(src, path[start:end])
        self.index.insert(dst, path[:end], now_s)
        self.num_moves += 1

    def _maybe_replicate(self, node: int | None, lightest: str, now_s: float) -> None:
        samples = self._ttft.get(node) if node is not None else None
        if node is None or not samples or lightest in self.index.holders(node):
            return
        while samples and samples[0][0] < now_s - self.load.window_s:
            samples.popleft()
        if len(samples) < 2:
            return
        mid = (samples[0][0] + now_s) / 2
        older = [t for s, t in samples if s < mid]
        newer = [t for s, t in samples if s >= mid]
        if (
            older
            and newer
            and sum(newer) / len(newer) >= self.replicate_ttft_ratio * sum(older) / len(older)
        ):
            path, _, end = self._node_path[node]
            self.index.insert(lightest, path[:end], now_s)
            samples.clear()
            self.num_replications += 1

    # ---- events ----------------------------------------------------------------------------
    def on_prefill_done(self, request_id: str, now_s: float, ttft_s: float | None = None) -> None:
        flight = self._in_flight.get(request_id)
        if flight is not None and not flight.is_prefill_done:
            flight.is_prefill_done = True
            if flight.prefill_s:
                self._prefill_s[flight.instance_id] -= flight.prefill_s
                flight.prefill_s = 0.0
            if ttft_s is not None:
                for node in flight.important_nodes:
                    self._ttft.setdefault(node, deque()).append((now_s, ttft_s))
        super().on_prefill_done(request_id, now_s, ttft_s)

    def on_finished(self, request_id: str, now_s: float) -> None:
        super().on_finished(request_id, now_s)
        flight = self._in_flight.pop(request_id, None)
        if flight is not None and flight.output_tokens:
            self._output_tokens[flight.instance_id] -= flight.output_tokens

    def check_consistency(self) -> None:
        super().check_consistency()
        self.load.check_consistency()
        for iid, total in self._prefill_s.items():
            expect = sum(f.prefill_s for f in self._in_flight.values() if f.instance_id == iid)
            assert abs(total - expect) < 1e-6, f"pending prefill time of {iid} drifted"
