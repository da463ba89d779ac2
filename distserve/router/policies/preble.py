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

*Rebalancing* (after ``warmup_requests_per_instance × instances`` dispatches), after every
dispatch. The load it compares is the window cost of an instance's *hot* nodes (>=
``hot_min_requests`` requests there in the window) — our reading: it is the part of the load a
move transfers, so the comparison cannot chase in-flight work that stays behind (with in-flight
costs included, moves thrashed in simulation). While the heaviest instance's load is >=
``rebalance_ratio`` × the lightest's, its cheapest hot nodes move to the lightest as long as that
does not overshoot, stopping once the gap is under the ratio; then the next heaviest against the
(updated) lightest. Moving re-points the index (the lightest is recorded as holding the node's
path, the heaviest no longer holds the node) and moves the node's window charges. When the
heaviest has a single hot node, moving it would only move the overload: if that node's mean TTFT
over the newer half of its window is >= ``replicate_ttft_ratio`` × the older half's, it is
**replicated** to the lightest (recorded as a second holder; no KV is copied) and exploit then
splits its requests by load. (ALGORITHMS.md says "only one hot prefix exists"; we read it per
heaviest instance, as a public reimplementation of Preble's scheduler does.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from distserve.router.policies.base import InstanceLoad, RouteRequest, register_policy
from distserve.router.policies.preble_load import InFlightLoad, PrefillTimeModel, WindowedLoad
from distserve.router.policies.prefix_aware import PrefixAwarePolicy


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
        self.in_flight = InFlightLoad()
        self._node_path: dict[
            int, tuple[tuple[int, ...], int, int]
        ] = {}  # node -> (path, start, end)
        self._ttft: dict[int, deque[tuple[float, float]]] = {}  # node -> (time, ttft) samples
        self.num_moves = 0
        self.num_replications = 0

    # ---- costs -----------------------------------------------------------------------------
    def load_cost(self, inst: InstanceLoad) -> float:
        iid = inst.instance_id
        return self.load.total(iid) + self.in_flight.cost(iid, self._tpot(inst))

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
        costs = [self.load_cost(i) for i in instances]
        pos: int | None = None
        if matched > req.num_prompt_tokens - matched:
            holders = self.index.holders(hashes[depth - 1])
            candidates = [p for p, i in enumerate(instances) if i.instance_id in holders]
            if candidates:
                pos = min(candidates, key=lambda p: costs[p])
        if pos is None:
            pos = self._explore(req, instances, costs, cached, now_s)
        chosen = instances[pos]
        self._record(req, chosen, cached.get(chosen.instance_id, 0), now_s)
        self.rebalance(instances, now_s)
        return chosen.instance_id

    def _explore(
        self,
        req: RouteRequest,
        instances: Sequence[InstanceLoad],
        costs: list[float],
        cached: dict[str, int],
        now_s: float,
    ) -> int:
        positions = range(len(instances))
        if self.explore_hit_ratio is not None:
            threshold = self.explore_hit_ratio
            warm = [
                p
                for p in positions
                if (self.load.hit_ratio(instances[p].instance_id) or 0.0) >= threshold
            ]
            if warm:
                return min(warm, key=lambda p: costs[p])
        # lowest load + eviction cost; eviction cost >= 0, so stop once load alone cannot win
        best: tuple[float, int] | None = None
        for p in sorted(positions, key=lambda p: (costs[p], p)):
            if best is not None and costs[p] > best[0]:
                break
            inst = instances[p]
            total = costs[p] + self.eviction_cost(inst, req, cached.get(inst.instance_id, 0), now_s)
            if best is None or (total, p) < best:
                best = (total, p)
        assert best is not None
        return best[1]

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
        deepest = important[-1] if important else None  # the request's node for TTFT and in-flight
        if inst.role == "colocated":
            self.in_flight.add(req.request_id, iid, 0.0, req.expected_output_tokens, deepest)
        else:
            pending_s = self.prefill_time(n - cached_tokens, cached_tokens)
            self.in_flight.add(req.request_id, iid, pending_s, 0, deepest)
        self._num_routed += 1
        if self._num_routed % 1024 == 0:  # forget nodes that left the window
            for node in [v for v in self._node_path if not self.load.num_requests(v)]:
                del self._node_path[node]
                self._ttft.pop(node, None)

    # ---- rebalancing -----------------------------------------------------------------------
    def rebalance(self, instances: Sequence[InstanceLoad], now_s: float) -> None:
        """Move or replicate hot prefixes (runs after every dispatch; callable directly)."""
        self._ensure_known(instances)
        if self._num_routed < self.warmup_requests_per_instance * len(instances):
            return
        by_id = {i.instance_id: i for i in instances}
        loads = {iid: self.hot_load(inst) for iid, inst in by_id.items()}
        heavy_first = sorted(loads, key=lambda iid: -loads[iid])
        light = heavy_first[-1]
        for heavy in heavy_first[:-1]:
            if loads[heavy] <= 0 or loads[heavy] < self.rebalance_ratio * loads[light]:
                return
            tpot = self._tpot(by_id[heavy])
            hot = sorted(
                (cost + self.in_flight.node_cost(heavy, node, tpot), node)
                for cost, node in self.load.hot_nodes(heavy)
            )
            if len(hot) == 1:  # moving its only hot prefix would move the overload: replicate
                cost, node = hot[0]
                if self._maybe_replicate(node, light, now_s):
                    loads[heavy] -= cost / 2
                    loads[light] += cost / 2
                continue
            for cost, node in hot:  # cheapest first, without overshooting
                if loads[heavy] - cost < loads[light] + cost:
                    break
                self._move(node, heavy, light, now_s)
                loads[heavy] -= cost
                loads[light] += cost
                if loads[heavy] < self.rebalance_ratio * loads[light]:
                    break

    def hot_load(self, inst: InstanceLoad) -> float:
        """The load rebalancing compares: window cost of the instance's hot nodes + in-flight
        cost accounted to it (moved with the nodes)."""
        iid = inst.instance_id
        return self.load.hot_total(iid) + self.in_flight.account_cost(iid, self._tpot(inst))

    def _tpot(self, inst: InstanceLoad) -> float:
        return inst.recent_tpot_s if inst.recent_tpot_s is not None else self.default_tpot_s

    def _move(self, node: int, src: str, dst: str, now_s: float) -> None:
        path, start, end = self._node_path[node]
        self.load.move(node, src, dst)
        self.in_flight.move(node, src, dst)
        self.index.blocks_evicted(src, path[start:end])
        self.index.insert(dst, path[:end], now_s)
        self.num_moves += 1

    def _maybe_replicate(self, node: int, lightest: str, now_s: float) -> bool:
        samples = self._ttft.get(node)
        if not samples or lightest in self.index.holders(node):
            return False
        while samples and samples[0][0] < now_s - self.load.window_s:
            samples.popleft()
        if len(samples) < 2:
            return False
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
            return True
        return False

    # ---- events ----------------------------------------------------------------------------
    def on_prefill_done(self, request_id: str, now_s: float, ttft_s: float | None = None) -> None:
        node = self.in_flight.prefill_done(request_id)
        if node is not None and ttft_s is not None:
            self._ttft.setdefault(node, deque()).append((now_s, ttft_s))
        super().on_prefill_done(request_id, now_s, ttft_s)

    def on_finished(self, request_id: str, now_s: float) -> None:
        super().on_finished(request_id, now_s)  # calls on_prefill_done first if it was not
        self.in_flight.finished(request_id)

    def check_consistency(self) -> None:
        super().check_consistency()
        self.load.check_consistency()
        self.in_flight.check_consistency()
