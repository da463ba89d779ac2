"""``preble``: Preble's E2 global scheduler, Preble-E2-like (ALGORITHMS.md §3), over block hashes.

Owns the E2 rule and our adaptations of it (listed below). It does not own the index
(``prefix_index.py``) or the load sums (``preble_load.py``). Per request, in this order:

1. ``matched`` = tokens of the deepest prompt block some instance holds, ``missed`` = the rest.
2. **Exploit** if ``matched > missed`` (a tie explores): among the holders of that deepest block,
   the lowest load cost.
3. **Explore** otherwise: the lowest ``load cost + eviction cost`` over all instances. (With
   ``explore_hit_ratio`` set, the released code's detail: if some instance's windowed prefix hit
   ratio is >= it, the lowest load cost among those.)
4. Record the assignment on every block of the path (dispatch time) and charge the load.
5. **Replicate** the request's node if all its holders are congested (adaptations c, h).
6. **Rebalance** (after the warm-up): move or replicate hot nodes away from the busiest instances.

*Nodes over block hashes.* The hashes form a trie (one block per node, see ``PrefixIndex``); the
radix-tree node of a prompt's path is a maximal run of blocks between branch points (a block
with more than one child ends a node; the prompt's last block ends its last node). A node is
*important* when it is longer than all of its ancestors together (``end − start > start``, in
blocks); the root node always is, and a path has at most log2(blocks) of them. A node is named
by the hash of its first block; its holders are the index's holders of that block.

*Load cost* of instance g (``preble_load`` keeps both terms incrementally)::

    load(g) = in_flight(g) + load_horizon_s × W(g) / window_s
    W(g)    = Σ_{important v held by g} C(v) / |holders(v)|,   C(v) = Σ charges of v in the window

``W`` is Preble's ``Σ_v miss rate(v)·requests(v)·PrefillTime(v) / holders(v)``; ``in_flight`` is
the pending ``PrefillTime`` of the requests dispatched to g and not yet prefilled, plus, on a
colocated instance, ``expected output × recent TPOT`` per request in flight (Preble's decode
cost). *Eviction cost*: if the request's uncached blocks exceed g's free blocks, walk g's LRU
blocks (skipping the request's own path) as an LRU eviction would; each evicted important node v
adds ``(requests(v) − 1) / |holders(v)| × PrefillTime(v)``: the recomputation its loss causes,
weighted by its hit frequency and shared with its other holders.

*Rebalancing*, after every dispatch once ``warmup_requests + warmup_requests_per_instance ×
instances`` requests were routed: while the busiest instance's hot load (``W`` over hot nodes:
>= ``hot_min_requests`` requests in the window) is >= ``rebalance_ratio`` × the lightest's, its
cheapest hot nodes move to the lightest as long as that does not overshoot; then the next
busiest against the (updated) lightest. Moving re-points the index (the lightest is recorded as
holding the node's path, the busiest no longer holds the node), which hands the node's window
cost over. If the busiest has a single hot node and that node's mean TTFT over the newer half
of the window is >= ``replicate_ttft_ratio`` × the older half's, it is **replicated** to the
lightest instead (a second holder; no KV is copied; exploit then splits its requests by load).

Our adaptations, where the released algorithm is ambiguous or defeats itself at 16–64 instances
(each measured in the cluster simulator with ``benchmarks/routing.py``; see docs/benchmarks.md):

a. *A request's whole miss is charged, and a node's cost is shared by its holders.* A request
   charges each important node on its path the ``PrefillTime`` of its own uncached tokens from
   that node down to the next important node (the prompt's end for the last), so a request that
   hits its shared prefix still charges its unique suffix (the released code approximates this
   with the node's miss rate). ``C(v)`` is split over v's holders as in Preble's formula, so a
   replica takes its share of the load at once.
b. *The window cost is read as a rate.* Preble adds the window's total (minutes of work) to the
   in-flight work (seconds); the window then swamps the queue, and exploit sends every request of
   a prefix to the holder with the least *past* work while its queue grows (simulated: a 1.5 s
   average TTFT on one of 16 instances). We scale ``W`` to the work it implies over the next
   ``load_horizon_s`` (3 s; 0–10 s all did well in simulation, 30 s and more did not):
   ``load_horizon_s = window_s`` is the literal formula.
c. *Replication is also triggered by the holders' queues, not only by the TTFT window* (which
   needs a window of history and reacts after the queue has built). After each dispatch, for
   the request's deepest important node v, if v is hot and every holder's load is >=
   ``rebalance_ratio`` × what the lightest non-holder's would be with v copied there (its load
   + the time to prefill v's path), v is replicated to it: Preble's 1.5× rule applied to queues
   and window work (adaptation h), counting the copy. The test runs again after later
   dispatches, so a very hot prefix gains as many replicas as its load needs, one at a time,
   warm-up or not.
d. *Moves pay for their copy and need a queue to relieve.* A move must not overshoot even after
   the lightest recomputes the node (``busiest − c >= lightest + c + copy``), and the busiest's
   pending prefill must pass adaptation c's test against the lightest's; moves that only evened
   out window history cost a recompute each and raised latency in simulation.
e. *In-flight work is counted at dispatch time, realistically.* Queued prompts run in batches, so
   ``PrefillTime``'s constant is counted once per instance, not per queued request; and the first
   request sent to a replica or a move's destination is charged the full copy (the index claims
   the path at once, but the KV is only computed by that request).
f. The single-hot-node case is read per busiest instance (a public reimplementation of Preble's
   scheduler does the same), and its TTFT test is re-run only once the node has a new sample. The hit-ratio explore detail is off by default
   (``explore_hit_ratio=None``): the released server passes no hit ratios (a TODO there), and in a
   prefix-heavy workload every instance soon passes 0.7, which turns explore into least-load.
g. The warm-up is ALGORITHMS.md's 50 requests per instance, and gates rebalancing only: the hot
   prefix's first holder is no longer stuck alone during it, since adaptation c replicates it.
h. *Replication compares sustained loads, with W read over the history the window holds.*
   Adaptation c's test compares prefill loads, not queues alone: every holder's ``pending
   prefill + load_horizon_s × W / history`` must be >= ``rebalance_ratio`` × the lightest
   non-holder's plus the copy, where ``history = min(window_s, now − oldest charge)``, at least
   the horizon (``sustained_scale``); a holder's load leaves out (scaled the same way) its
   one-off computation of v's path, which no copy relieves. A queue alone misses a holder that
   is busy without a backlog: in programming at 64 instances the hottest prefixes stayed on 2–3
   holders each (cache_aware spread them over 5–16) and their hits took ~30% longer once warm;
   W over the full 180 s window, while the window holds 12 s of history, understated their
   rate 15×. Counting the destination's window work also keeps the cold start, when every
   instance is computing first misses, from copying prefixes onto instances just as busy
   (tool_use at 4 instances: 36–46 copies per run before, 0–3 after). The routing cost keeps
   b's scale: there, a rate over a short history is dominated by one-off first misses, and
   using it made tool_use at 4 instances worse (avg TTFT 0.12 → 0.17 s).
i. *A copy pays for what it evicts.* A replica or move costs, besides computing the path on
   the destination, the recomputation of the hot nodes its blocks push out there (LRU blocks
   the index holds beyond the destination's empty blocks; each evicted hot node's prefill time
   once, shared by its holders). The empty blocks are ``total − indexed``, at most the reported
   free count: ``free_kv_blocks`` includes evictable cached blocks, so it cannot say what a
   copy evicts (explore's eviction cost still reads it, and so was non-zero in 4 of 844
   explores in long_doc_qa at 4 instances, 0 of 150 in tool_use). In long_doc_qa at 4
   instances (KV for ~2.8 documents each) copies of 21k-token documents displaced other hot
   documents: 161 copies, hit rate 0.42 and p99 TTFT 32 s vs cache_aware's 0.48 and 29 s; with
   this, 87 copies, 0.45 and 23 s.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

from distserve.router.policies.base import InstanceLoad, RouteRequest, register_policy
from distserve.router.policies.preble_load import (
    InFlightLoad,
    PrefillTimeModel,
    TTFTWindow,
    WindowedLoad,
)
from distserve.router.policies.prefix_aware import PrefixAwarePolicy


@register_policy
class PreblePolicy(PrefixAwarePolicy):
    name = "preble"

    def __init__(
        self,
        window_s: float = 180.0,
        prefill_time: tuple[float, float, float, float] = (0.0181, 1.02e-4, 0.0, 1.42e-8),
        load_horizon_s: float = 3.0,
        rebalance_ratio: float = 1.5,
        warmup_requests: int = 0,
        warmup_requests_per_instance: int = 50,
        hot_min_requests: int = 2,
        replicate_ttft_ratio: float = 2.0,
        explore_hit_ratio: float | None = None,
        default_tpot_s: float = 0.05,
    ) -> None:
        super().__init__(window_s=window_s)
        if rebalance_ratio <= 1.0:
            raise ValueError(f"rebalance_ratio must be > 1, got {rebalance_ratio}")
        if hot_min_requests < 1:
            raise ValueError(f"hot_min_requests must be >= 1, got {hot_min_requests}")
        if load_horizon_s < 0:
            raise ValueError(f"load_horizon_s must be >= 0, got {load_horizon_s}")
        self.prefill_time = PrefillTimeModel(*prefill_time)
        self.load_horizon_s = load_horizon_s
        self.rebalance_ratio = rebalance_ratio
        self.warmup_requests = warmup_requests
        self.warmup_requests_per_instance = warmup_requests_per_instance
        self.replicate_ttft_ratio = replicate_ttft_ratio
        self.explore_hit_ratio = explore_hit_ratio
        self.default_tpot_s = default_tpot_s
        self.load = WindowedLoad(window_s, hot_min_requests)
        self.in_flight = InFlightLoad(batch_overhead_s=self.prefill_time.a_s)
        self.index.set_holder_listener(self._on_holder_change)
        self._ttft: dict[int, TTFTWindow] = {}  # node -> TTFT samples in the window
        self._ttft_checked: dict[int, int] = {}  # node -> samples seen when last tested "no"
        self._num_routed = 0
        self.num_exploits = 0
        self.num_moves = 0
        self.num_replications = 0  # by the TTFT rule
        self.num_queue_replications = 0  # by the holders' queues (adaptation c)

    # ---- costs -----------------------------------------------------------------------------
    def load_cost(self, inst: InstanceLoad) -> float:
        iid = inst.instance_id
        scale = self.load_horizon_s / self.load.window_s
        cost = self.in_flight.pending_prefill_s(iid) + scale * self.load.share(iid)
        if inst.role == "colocated":  # the same arithmetic as load_costs, so ties stay ties
            cost += self.in_flight.output_tokens(iid) * self._tpot(inst)
        return cost

    def load_costs(
        self, instances: Sequence[InstanceLoad], ids: list[str] | None = None
    ) -> list[float]:
        """``load_cost`` of every instance, in order (one pass over the instances)."""
        if ids is None:
            ids = [i.instance_id for i in instances]
        scale = self.load_horizon_s / self.load.window_s
        costs = [
            q + scale * w
            for q, w in zip(self.in_flight.pending(ids), self.load.shares(ids), strict=True)
        ]
        for p, inst in enumerate(instances):
            if inst.role == "colocated":
                costs[p] += self.in_flight.output_tokens(inst.instance_id) * self._tpot(inst)
        return costs

    def sustained_scale(self, now_s: float) -> float:
        """The factor that turns W into the work it implies over the next ``load_horizon_s``
        when W is read over the history the window actually holds (adaptation h): W covers
        ``min(window_s, now − oldest charge)`` seconds, not ``window_s``, while the window is
        filling; a history shorter than the horizon counts as the horizon."""
        if self.load_horizon_s == 0.0:
            return 0.0
        return self.load_horizon_s / max(self.load.history_s(now_s), self.load_horizon_s)

    def eviction_cost(
        self, inst: InstanceLoad, req: RouteRequest, num_cached_blocks: int, now_s: float
    ) -> float:
        need = -(-req.num_prompt_tokens // req.block_size) - num_cached_blocks
        if inst.total_kv_blocks == 0 or need <= inst.free_kv_blocks:
            return 0.0
        to_evict = need - inst.free_kv_blocks
        on_path = set(req.block_hashes)
        cost, evicted = 0.0, 0
        for h in self.index.lru_blocks(inst.instance_id):
            if h in on_path:
                continue
            v = self.load.node(h)
            if v is not None and v.num_requests > 1:
                node_s = self.prefill_time((v.end - v.start) * v.block_size, v.start * v.block_size)
                cost += (v.num_requests - 1) / max(1, len(v.holders)) * node_s
            evicted += 1
            if evicted >= to_evict:
                break
        return cost

    # ---- the decision ----------------------------------------------------------------------
    def select_prefill(
        self, req: RouteRequest, instances: Sequence[InstanceLoad], now_s: float
    ) -> str:
        self._ensure_known(instances)
        for node in self.load.expire(now_s):
            self.index.unwatch(node)
            self._ttft.pop(node, None)
            self._ttft_checked.pop(node, None)
        hashes, n = req.block_hashes, req.num_prompt_tokens
        ids = [i.instance_id for i in instances]
        depth = self.index.deepest_present(hashes)
        matched = min(depth * req.block_size, n)
        chosen: InstanceLoad | None = None
        if matched > n - matched:
            chosen = self._lightest(instances, ids, among=self.index.holders(hashes[depth - 1]))
        if chosen is None:
            chosen = self._explore(req, instances, ids, now_s)
        else:
            self.num_exploits += 1
        deepest = self._record(req, chosen, now_s)
        if deepest is not None:
            self._replicate_if_queued(deepest, instances, ids, now_s)
        self._rebalance(instances, ids, now_s)
        return chosen.instance_id

    def _lightest(
        self,
        instances: Sequence[InstanceLoad],
        ids: list[str],
        among: Container[str] | None = None,
        exclude: Container[str] = (),
    ) -> InstanceLoad | None:
        """The lowest load cost (ties: list order) among ``among`` (all if None) but not
        ``exclude``; None when no instance qualifies."""
        positions = [
            p for p, iid in enumerate(ids) if (among is None or iid in among) and iid not in exclude
        ]
        if len(positions) <= 4:
            costs = {p: self.load_cost(instances[p]) for p in positions}
        else:
            all_costs = self.load_costs(instances, ids)
            costs = {p: all_costs[p] for p in positions}
        return instances[min(positions, key=costs.__getitem__)] if positions else None

    def _explore(
        self, req: RouteRequest, instances: Sequence[InstanceLoad], ids: list[str], now_s: float
    ) -> InstanceLoad:
        costs = self.load_costs(instances, ids)
        positions = range(len(instances))
        if self.explore_hit_ratio is not None:
            threshold = self.explore_hit_ratio
            warm = [
                p
                for p in positions
                if (self.load.hit_ratio(instances[p].instance_id) or 0.0) >= threshold
            ]
            if warm:
                return instances[min(warm, key=costs.__getitem__)]
        # lowest load + eviction cost; eviction cost >= 0, so the lightest wins if it evicts
        # nothing, and otherwise we stop once load alone cannot win
        first = min(positions, key=costs.__getitem__)
        if self._eviction_cost_at(instances[first], req, now_s) == 0.0:
            return instances[first]
        best: tuple[float, int] | None = None
        for p in sorted(positions, key=lambda p: (costs[p], p)):
            if best is not None and costs[p] > best[0]:
                break
            total = costs[p] + self._eviction_cost_at(instances[p], req, now_s)
            if best is None or (total, p) < best:
                best = (total, p)
        assert best is not None
        return instances[best[1]]

    def _eviction_cost_at(self, inst: InstanceLoad, req: RouteRequest, now_s: float) -> float:
        blocks = -(-req.num_prompt_tokens // req.block_size)
        if inst.total_kv_blocks == 0 or blocks <= inst.free_kv_blocks:
            return 0.0  # fits without counting cached blocks
        cached = self.index.num_cached(inst.instance_id, req.block_hashes)
        return self.eviction_cost(inst, req, cached, now_s)

    def _record(self, req: RouteRequest, inst: InstanceLoad, now_s: float) -> int | None:
        """Claim the path for ``inst``, charge its important nodes, count the in-flight work;
        returns the request's deepest important node (None for a prompt without a full block)."""
        iid, hashes, bs, n = (
            inst.instance_id,
            req.block_hashes,
            req.block_size,
            req.num_prompt_tokens,
        )
        cached_blocks = self.index.num_cached(iid, hashes)
        self.index.insert(iid, hashes, now_s)
        important = self._important_nodes(hashes)
        for start, _ in important:  # a claimed copy is computed by its first request (adapt. e)
            v = self.load.node(hashes[start])
            if v is not None and iid in v.copies:
                v.copies.discard(iid)
                cached_blocks = min(cached_blocks, start)
        cached_tokens = min(cached_blocks * bs, n)
        is_first_charge = True
        for i, (start, end) in enumerate(important):
            seg_end = important[i + 1][0] * bs if i + 1 < len(important) else n
            first_missed = max(start * bs, cached_tokens)
            cost = self.prefill_time.work_s(seg_end - first_missed, first_missed)
            if cost > 0 and is_first_charge:
                cost += self.prefill_time.a_s
                is_first_charge = False
            node = hashes[start]
            v = self.load.node(node)
            if v is None:
                self.load.add_node(node, hashes, start, end, bs, self.index.holders(node))
                self.index.watch(node)
            elif end < v.end:  # a branch appeared inside the node since it was first seen
                v.end = end
            self.load.charge(now_s, node, cost)
        self.load.record_hit(now_s, iid, cached_tokens, n)
        deepest = hashes[important[-1][0]] if important else None
        pending_s = self.prefill_time.work_s(n - cached_tokens, cached_tokens)
        outputs = req.expected_output_tokens if inst.role == "colocated" else 0
        self.in_flight.add(req.request_id, iid, pending_s, outputs, deepest)
        self._num_routed += 1
        return deepest

    def _important_nodes(self, hashes: Sequence[int]) -> list[tuple[int, int]]:
        """``(start, end)`` blocks of the important radix-tree nodes on the path, root first."""
        important: list[tuple[int, int]] = []
        start = 0
        for end in self.index.node_ends(hashes):
            if end - start > start:
                important.append((start, end))
            start = end
        return important

    # ---- replication by queue (adaptation c) -----------------------------------------------
    def _replicate_if_queued(
        self, node: int, instances: Sequence[InstanceLoad], ids: list[str], now_s: float
    ) -> None:
        """Adaptations c and h: copy hot ``node`` to the lightest non-holder when every
        holder's sustained prefill load is >= the rebalance ratio × that instance's with the
        copy."""
        v = self.load.node(node)
        if v is None or not v.is_hot:
            return
        holders = v.holders
        if not any(iid in holders for iid in ids):
            return
        # prefill work only, as a copy moves prefill work (colocated decode stays where it is)
        scale = self.sustained_scale(now_s)
        queues = self.in_flight.pending(ids)
        loads = [q + scale * w for q, w in zip(queues, self.load.shares(ids), strict=True)]
        # a holder's window holds its one-off computation of v's path, which no copy relieves
        one_off_s = scale * self.prefill_time(v.end * v.block_size, 0)
        best_s = min(
            max(q, c - one_off_s)
            for q, c, iid in zip(queues, loads, ids, strict=True)
            if iid in holders
        )
        # any copy recomputes at least the node's own blocks: skip the scan when even that
        # is more than the best holder's load
        min_copy_s = self.prefill_time((v.end - v.start) * v.block_size, 0)
        if best_s <= 0 or best_s < self.rebalance_ratio * min_copy_s:
            return
        light = min(
            (p for p, iid in enumerate(ids) if iid not in holders),
            key=loads.__getitem__,
            default=None,
        )
        if light is None:
            return
        dst = instances[light]
        if best_s >= self.rebalance_ratio * (loads[light] + self._copy_s(node, dst)):
            self._claim_copy(node, dst.instance_id, now_s)
            self.num_queue_replications += 1

    def _relieves(self, queue_s: float, dst: InstanceLoad, node: int) -> bool:
        """Whether a queue of ``queue_s`` is worth copying ``node`` to ``dst`` for: >= the
        rebalance ratio × what ``dst``'s queue would be with the copy (``_copy_s``)."""
        dst_queue_s = self.in_flight.pending_prefill_s(dst.instance_id)
        return queue_s > 0 and queue_s >= self.rebalance_ratio * (
            dst_queue_s + self._copy_s(node, dst)
        )

    def _copy_s(self, node: int, dst: InstanceLoad) -> float:
        """What copying ``node``'s path to ``dst`` costs: its prefill time after what ``dst``
        already holds, plus the recomputation of the hot nodes it pushes out (adaptation i)."""
        v = self.load.node(node)
        assert v is not None
        path = v.path[: v.end]
        cached = self.index.num_cached(dst.instance_id, path)
        copy_s = self.prefill_time((len(path) - cached) * v.block_size, cached * v.block_size)
        return copy_s + self._copy_eviction_s(dst, path, len(path) - cached)

    def _copy_eviction_s(self, dst: InstanceLoad, path: Sequence[int], need: int) -> float:
        """Adaptation i: the recomputation a copy of ``need`` blocks of ``path`` causes on
        ``dst``: walk the LRU blocks the index holds there beyond its empty blocks (``total −
        indexed``, at most the instance's free count: that count includes evictable cached
        blocks, so it cannot tell what a copy evicts), and add the prefill time of each hot
        node evicted, shared by its holders (once: it is cached again by its next request)."""
        iid, total = dst.instance_id, dst.total_kv_blocks
        if total == 0:
            return 0.0
        empty = min(dst.free_kv_blocks, total - self.index.num_blocks(iid))
        if need <= empty:
            return 0.0
        to_evict, evicted, cost_s = need - empty, 0, 0.0
        on_path = set(path)
        for h in self.index.lru_blocks(iid):
            if h in on_path:
                continue
            w = self.load.node(h)
            if w is not None and w.is_hot:
                w_s = self.prefill_time((w.end - w.start) * w.block_size, w.start * w.block_size)
                cost_s += w_s / max(1, len(w.holders))
            evicted += 1
            if evicted >= to_evict:
                break
        return cost_s

    def _claim_copy(self, node: int, dst: str, now_s: float) -> None:
        v = self.load.node(node)
        assert v is not None
        self.index.insert(dst, v.path[: v.end], now_s)
        v.copies.add(dst)

    # ---- rebalancing -----------------------------------------------------------------------
    def rebalance(self, instances: Sequence[InstanceLoad], now_s: float) -> None:
        """Move or replicate hot prefixes (runs after every dispatch; callable directly)."""
        self._ensure_known(instances)
        self._rebalance(instances, [i.instance_id for i in instances], now_s)

    def _rebalance(self, instances: Sequence[InstanceLoad], ids: list[str], now_s: float) -> None:
        warmup = self.warmup_requests + self.warmup_requests_per_instance * len(instances)
        if self._num_routed < warmup or len(instances) < 2:
            return
        loads = self.load.hot_shares(ids)
        ratio = self.rebalance_ratio
        if max(loads) <= 0 or max(loads) < ratio * min(loads):
            return  # the common case, in one pass
        light_pos = loads.index(min(loads))
        light, light_inst = ids[light_pos], instances[light_pos]
        threshold = ratio * min(loads)
        heavy_first = sorted(
            (p for p, load in enumerate(loads) if load >= threshold and ids[p] != light),
            key=lambda p: -loads[p],
        )
        hot, queue = self.load.hot_share, self.in_flight.pending_prefill_s
        light_load, light_queue = hot(light), queue(light)
        for p in heavy_first:  # a move changes only its pair: the later loads stay valid
            heavy = ids[p]
            if loads[p] <= 0 or loads[p] < ratio * light_load:
                return
            if self.load.num_hot_nodes(heavy) == 1:  # moving it would move the overload
                if self._maybe_replicate(self.load.any_hot_node(heavy), light, now_s):
                    light_load = hot(light)
                continue
            if queue(heavy) <= 0 or queue(heavy) < ratio * light_queue:
                continue  # no move can pass adaptation d's queue test: skip the sort
            for cost, node in sorted(self.load.hot_nodes(heavy)):  # cheapest first (adapt. d)
                copy_s = self._copy_s(node, light_inst)
                if hot(heavy) - cost < hot(light) + cost + copy_s:
                    break
                if not self._relieves(queue(heavy), light_inst, node):
                    break
                self._move(node, heavy, light, now_s)
                if hot(heavy) < ratio * hot(light):
                    break
            light_load = hot(light)

    def _tpot(self, inst: InstanceLoad) -> float:
        return inst.recent_tpot_s if inst.recent_tpot_s is not None else self.default_tpot_s

    def _move(self, node: int, src: str, dst: str, now_s: float) -> None:
        v = self.load.node(node)
        assert v is not None
        self._claim_copy(node, dst, now_s)
        self.index.blocks_evicted(src, v.path[v.start : v.end])
        self.num_moves += 1

    def _maybe_replicate(self, node: int, lightest: str, now_s: float) -> bool:
        v = self.load.node(node)
        samples = self._ttft.get(node)
        if v is None or samples is None or lightest in v.holders:
            return False
        if self._ttft_checked.get(node) == samples.num_added:
            return False  # no new sample since the last test said no
        samples.expire(now_s - self.load.window_s)
        halves = samples.half_means(now_s)
        if halves is None or halves[1] < self.replicate_ttft_ratio * halves[0]:
            self._ttft_checked[node] = samples.num_added
            return False
        self._claim_copy(node, lightest, now_s)
        samples.clear()
        self.num_replications += 1
        return True

    # ---- events ----------------------------------------------------------------------------
    def _on_holder_change(self, h: int, instance_id: str, is_added: bool) -> None:
        if is_added:
            self.load.holder_added(h, instance_id)
        else:
            self.load.holder_removed(h, instance_id)

    def on_prefill_done(self, request_id: str, now_s: float, ttft_s: float | None = None) -> None:
        node = self.in_flight.prefill_done(request_id)
        if node is not None and ttft_s is not None and node in self.load:
            samples = self._ttft.get(node)
            if samples is None:
                samples = self._ttft[node] = TTFTWindow()
            samples.add(now_s, ttft_s)
        super().on_prefill_done(request_id, now_s, ttft_s)

    def on_finished(self, request_id: str, now_s: float) -> None:
        super().on_finished(request_id, now_s)  # calls on_prefill_done first if it was not
        self.in_flight.finished(request_id)

    def check_consistency(self) -> None:
        super().check_consistency()
        self.load.check_consistency()
        self.in_flight.check_consistency()
        for node in [*self._ttft, *self._ttft_checked]:
            assert node in self.load, f"TTFT state kept for {node}, which left the window"
        for node in self.load.nodes():
            v = self.load.node(node)
            assert v is not None and v.holders == set(self.index.holders(node)), (
                f"holders of node {node} differ from the index's"
            )
            assert v.copies <= v.holders, f"copies of node {node} that are not holders"
