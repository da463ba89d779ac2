"""Load bookkeeping of the ``preble`` policy (Preble E2-like, ALGORITHMS.md §3).

Owns what E2's costs read, each kept incrementally so that no decision scans all instances × all
nodes (STYLE.md habit 11). It does not own routing decisions or the prefix index (``preble.py``,
``prefix_index.py``).

- :class:`PrefillTimeModel` — Preble's fitted ``PrefillTime(extend, context)``.
- :class:`WindowedLoad` — over a sliding window of ``window_s`` seconds, per radix-tree node v
  its prefill cost ``C(v)`` (the sum of the charges of requests routed through it), its request
  count and its holder set (mirrored from the prefix index by the policy); per instance g

      W(g)     = Σ_{v held by g} C(v) / |holders(v)|        Preble's Σ_v miss·requests·PrefillTime / holders
      W_hot(g) = the same over hot nodes (>= hot_min_requests requests in the window)

  and the prefix hit ratio. A charge of δ on v adds δ/k to each of v's k holders; a holder
  joining or leaving re-splits ``C(v)`` over the new set — so replicating a node hands part of
  its window cost to the replica, and moving it hands all of it over, without touching charges.
  Costs are O(holders of the node) per update and O(1) per query.
- :class:`InFlightLoad` — per instance the work dispatched there and not done yet: the pending
  ``PrefillTime`` until the first token, and the expected output tokens until the request
  finishes (colocated instances: Preble's decode cost, read × the instance's TPOT).

    charge ─▶ window (deque, oldest first) ─▶ expire: C(v) −= cost, count −= 1, node dropped at 0
                │                                           │
                └──▶ C(v) ──split over holders(v)──▶ W(g), W_hot(g) ◀── holder joined / left
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillTimeModel:
    """Preble's fitted ``PrefillTime(extend, context) = a + b·extend + c·context + d·extend·context``
    (seconds). Defaults: DistServe's OPT-13B A100 TP1 prefill fit rewritten in this form."""

    a_s: float = 0.0181
    b_s: float = 1.02e-4
    c_s: float = 0.0
    d_s: float = 1.42e-8

    def __call__(self, extend_tokens: int, context_tokens: int) -> float:
        if extend_tokens <= 0:
            return 0.0
        return self.a_s + self.work_s(extend_tokens, context_tokens)

    def work_s(self, extend_tokens: int, context_tokens: int) -> float:
        """The marginal part (no constant ``a``): the cost of one segment of a longer prompt."""
        if extend_tokens <= 0:
            return 0.0
        e, k = extend_tokens, context_tokens
        return self.b_s * e + self.c_s * k + self.d_s * e * k


class WindowNode:
    """One radix-tree node with charges in the window (named by the hash of its first block)."""

    __slots__ = (
        "block_size",
        "copies",
        "cost_s",
        "end",
        "holders",
        "is_hot",
        "num_requests",
        "path",
        "start",
    )

    def __init__(
        self, path: tuple[int, ...], start: int, end: int, block_size: int, holders: Iterable[str]
    ) -> None:
        self.path = path  # hashes of a prompt through the node; the node is blocks [start, end)
        self.start = start
        self.end = end
        self.block_size = block_size  # tokens per block of those hashes
        self.holders: set[str] = set(holders)  # mirrors the index's holders of path[start]
        self.copies: set[str] = set()  # holders by replication or move, not yet computed there
        self.cost_s = 0.0  # C(v): Σ charges in the window
        self.num_requests = 0  # requests through the node in the window, all instances
        self.is_hot = False


class WindowedLoad:
    """Sliding-window prefill costs per node, split over holders into per-instance loads."""

    def __init__(self, window_s: float, hot_min_requests: int = 2) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self.hot_min_requests = hot_min_requests
        self._nodes: dict[int, WindowNode] = {}
        self._charges: deque[tuple[float, int, float]] = deque()  # (time, node, cost)
        self._share: dict[str, float] = {}  # W(g)
        self._hot_share: dict[str, float] = {}  # W_hot(g)
        self._hot_of: dict[str, set[int]] = {}  # hot nodes each instance holds
        self._hits: deque[tuple[float, str, int, int]] = deque()
        self._hit_sums: dict[str, list[int]] = {}  # instance -> [cached tokens, prompt tokens]

    # ---- nodes and holders -----------------------------------------------------------------
    def __contains__(self, node: int) -> bool:
        return node in self._nodes

    def node(self, node: int) -> WindowNode | None:
        return self._nodes.get(node)

    def add_node(
        self,
        node: int,
        path: tuple[int, ...],
        start: int,
        end: int,
        block_size: int,
        holders: Iterable[str],
    ) -> WindowNode:
        """Start tracking ``node`` (no cost yet, so no instance's load changes)."""
        assert node not in self._nodes, f"node {node} is already tracked"
        v = self._nodes[node] = WindowNode(path, start, end, block_size, holders)
        return v

    def holder_added(self, node: int, instance_id: str) -> None:
        v = self._nodes.get(node)
        if v is None or instance_id in v.holders:
            return
        k = len(v.holders)
        if k:
            self._spread(v, v.cost_s / (k + 1) - v.cost_s / k)
        v.holders.add(instance_id)
        self._add_share(instance_id, node, v, v.cost_s / (k + 1))

    def holder_removed(self, node: int, instance_id: str) -> None:
        v = self._nodes.get(node)
        if v is None or instance_id not in v.holders:
            return
        k = len(v.holders)
        v.holders.discard(instance_id)
        v.copies.discard(instance_id)
        self._add_share(instance_id, node, v, -v.cost_s / k)
        if v.is_hot:
            self._hot_of[instance_id].discard(node)
        if k > 1:
            self._spread(v, v.cost_s / (k - 1) - v.cost_s / k)

    # ---- charges ---------------------------------------------------------------------------
    def charge(self, now_s: float, node: int, cost_s: float) -> None:
        """One request through ``node`` (tracked) costing ``cost_s`` of prefill."""
        v = self._nodes[node]
        self._charges.append((now_s, node, cost_s))
        v.num_requests += 1
        v.cost_s += cost_s
        if v.holders:
            self._spread(v, cost_s / len(v.holders))
        if not v.is_hot and v.num_requests >= self.hot_min_requests:
            self._set_hot(node, v, True)

    def record_hit(
        self, now_s: float, instance_id: str, cached_tokens: int, prompt_tokens: int
    ) -> None:
        self._hits.append((now_s, instance_id, cached_tokens, prompt_tokens))
        sums = self._hit_sums.setdefault(instance_id, [0, 0])
        sums[0] += cached_tokens
        sums[1] += prompt_tokens

    def expire(self, now_s: float) -> list[int]:
        """Drop everything older than the window; returns the nodes that left it."""
        horizon = now_s - self.window_s
        left: list[int] = []
        charges = self._charges
        while charges and charges[0][0] < horizon:
            _, node, cost_s = charges.popleft()
            v = self._nodes[node]
            v.num_requests -= 1
            v.cost_s -= cost_s
            if v.holders:
                self._spread(v, -cost_s / len(v.holders))
            if v.is_hot and v.num_requests < self.hot_min_requests:
                self._set_hot(node, v, False)
            if v.num_requests == 0:
                if v.holders:  # float residue of the adds and subtracts
                    self._spread(v, -v.cost_s / len(v.holders))
                del self._nodes[node]
                left.append(node)
        while self._hits and self._hits[0][0] < horizon:
            _, iid, cached, prompt = self._hits.popleft()
            self._hit_sums[iid][0] -= cached
            self._hit_sums[iid][1] -= prompt
        return left

    # ---- queries ---------------------------------------------------------------------------
    def share(self, instance_id: str) -> float:
        """W(g): the window cost of the nodes the instance holds, each split over its holders."""
        return max(0.0, self._share.get(instance_id, 0.0))  # max: float round-off

    def hot_share(self, instance_id: str) -> float:
        """W_hot(g): the same over hot nodes only (what rebalancing compares and moves)."""
        return max(0.0, self._hot_share.get(instance_id, 0.0))

    def hot_shares(self, instance_ids: list[str]) -> list[float]:
        """``hot_share`` of each instance, in order."""
        values = [self._hot_share.get(iid, 0.0) for iid in instance_ids]
        return [x if x > 0.0 else 0.0 for x in values]

    def num_hot_nodes(self, instance_id: str) -> int:
        return len(self._hot_of.get(instance_id, ()))

    def any_hot_node(self, instance_id: str) -> int:
        """One hot node the instance holds (its only one, when ``num_hot_nodes`` is 1)."""
        return next(iter(self._hot_of[instance_id]))

    def hot_nodes(self, instance_id: str) -> list[tuple[float, int]]:
        """``(C(v) / |holders(v)|, v)`` of the hot nodes the instance holds."""
        out = []
        for node in self._hot_of.get(instance_id, ()):
            v = self._nodes[node]
            out.append((v.cost_s / len(v.holders), node))
        return out

    def nodes(self) -> list[int]:
        return list(self._nodes)

    def shares(self, instance_ids: list[str]) -> list[float]:
        """``share`` of each instance, in order (one pass, for a decision over all instances)."""
        values = [self._share.get(iid, 0.0) for iid in instance_ids]
        return [x if x > 0.0 else 0.0 for x in values]  # clamp float round-off

    def num_requests(self, node: int) -> int:
        v = self._nodes.get(node)
        return 0 if v is None else v.num_requests

    def hit_ratio(self, instance_id: str) -> float | None:
        """Cached / prompt tokens of requests routed to the instance in the window; None if none."""
        sums = self._hit_sums.get(instance_id)
        return sums[0] / sums[1] if sums and sums[1] > 0 else None

    def history_s(self, now_s: float) -> float:
        """Seconds of history the window holds at ``now_s``: from its oldest charge, at most
        ``window_s`` (0 with no charges)."""
        if not self._charges:
            return 0.0
        return min(self.window_s, max(0.0, now_s - self._charges[0][0]))

    def __len__(self) -> int:
        return len(self._nodes)

    # ---- internals -------------------------------------------------------------------------
    def _spread(self, v: WindowNode, per_holder_s: float) -> None:
        share, hot = self._share, self._hot_share
        for iid in v.holders:
            share[iid] = share.get(iid, 0.0) + per_holder_s
            if v.is_hot:
                hot[iid] = hot.get(iid, 0.0) + per_holder_s

    def _add_share(self, instance_id: str, node: int, v: WindowNode, amount_s: float) -> None:
        self._share[instance_id] = self._share.get(instance_id, 0.0) + amount_s
        if v.is_hot:
            self._hot_share[instance_id] = self._hot_share.get(instance_id, 0.0) + amount_s
            self._hot_of.setdefault(instance_id, set()).add(node)

    def _set_hot(self, node: int, v: WindowNode, is_hot: bool) -> None:
        v.is_hot = is_hot
        if not v.holders:
            return
        per_holder = v.cost_s / len(v.holders) * (1 if is_hot else -1)
        for iid in v.holders:
            self._hot_share[iid] = self._hot_share.get(iid, 0.0) + per_holder
            hot = self._hot_of.setdefault(iid, set())
            if is_hot:
                hot.add(node)
            else:
                hot.discard(node)

    def check_consistency(self) -> None:
        """Recompute every derived sum from the charges and compare (tests call this)."""
        cost: dict[int, float] = {}
        count: dict[int, int] = {}
        for _, node, c in self._charges:
            cost[node] = cost.get(node, 0.0) + c
            count[node] = count.get(node, 0) + 1
        assert set(count) == set(self._nodes), "tracked nodes differ from the charged ones"
        share: dict[str, float] = {}
        hot_share: dict[str, float] = {}
        hot_of: dict[str, set[int]] = {}
        for node, v in self._nodes.items():
            assert v.num_requests == count[node], f"request count of {node} drifted"
            assert abs(v.cost_s - cost[node]) < 1e-6, f"cost of {node} drifted"
            assert v.is_hot == (v.num_requests >= self.hot_min_requests), f"{node} hot flag"
            for iid in v.holders:
                share[iid] = share.get(iid, 0.0) + v.cost_s / len(v.holders)
                if v.is_hot:
                    hot_share[iid] = hot_share.get(iid, 0.0) + v.cost_s / len(v.holders)
                    hot_of.setdefault(iid, set()).add(node)
        for iid in set(share) | set(self._share):
            assert abs(self._share.get(iid, 0.0) - share.get(iid, 0.0)) < 1e-6, f"W({iid})"
        for iid in set(hot_share) | set(self._hot_share):
            got = self._hot_share.get(iid, 0.0)
            assert abs(got - hot_share.get(iid, 0.0)) < 1e-6, f"W_hot({iid})"
        for iid in set(hot_of) | set(self._hot_of):
            assert self._hot_of.get(iid, set()) == hot_of.get(iid, set()), f"hot nodes of {iid}"


class TTFTWindow:
    """TTFT samples of one node over the window, for Preble's "newer half >= 2 × older half"
    test in O(log samples): times and running sums in a list, expired from the front."""

    __slots__ = ("_start", "_sums", "_times", "num_added")

    def __init__(self) -> None:
        self._times: list[float] = []
        self._sums: list[float] = [0.0]  # _sums[i] = Σ ttft of samples before i
        self._start = 0  # samples before it have expired
        self.num_added = 0  # samples ever added (a version number for callers' caches)

    def add(self, time_s: float, ttft_s: float) -> None:
        self._times.append(time_s)
        self._sums.append(self._sums[-1] + ttft_s)
        self.num_added += 1

    def expire(self, horizon_s: float) -> None:
        self._start = bisect_left(self._times, horizon_s, lo=self._start)
        if self._start > 1024 and self._start * 2 > len(self._times):  # compact
            base = self._sums[self._start]
            self._times = self._times[self._start :]
            self._sums = [x - base for x in self._sums[self._start :]]
            self._start = 0

    def __len__(self) -> int:
        return len(self._times) - self._start

    def half_means(self, now_s: float) -> tuple[float, float] | None:
        """Mean TTFT of the samples before and after the middle of [first sample, now]; None
        unless both halves have samples."""
        if len(self) < 2:
            return None
        lo, hi = self._start, len(self._times)
        mid = bisect_left(self._times, (self._times[lo] + now_s) / 2, lo=lo)
        if mid in (lo, hi):
            return None
        older = (self._sums[mid] - self._sums[lo]) / (mid - lo)
        newer = (self._sums[hi] - self._sums[mid]) / (hi - mid)
        return older, newer

    def clear(self) -> None:
        self._times, self._sums, self._start = [], [0.0], 0


@dataclass
class _Flight:
    instance_id: str
    prefill_s: float  # pending prefill time; counted until the prefill is done
    output_tokens: int  # expected output; counted until finished (colocated instances)
    node: int | None  # the request's deepest important node (None: prompt has no full block)
    is_prefill_done: bool = False


class InFlightLoad:
    """Work dispatched to each instance and not done yet, updated at dispatch time."""

    def __init__(self, batch_overhead_s: float = 0.0) -> None:
        self.batch_overhead_s = batch_overhead_s
        self._flights: dict[str, _Flight] = {}
        self._prefill_s: dict[str, float] = {}
        self._num_pending: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def add(
        self,
        request_id: str,
        instance_id: str,
        prefill_s: float,
        output_tokens: int,
        node: int | None,
    ) -> None:
        self._flights[request_id] = _Flight(instance_id, prefill_s, output_tokens, node)
        self._prefill_s[instance_id] = self._prefill_s.get(instance_id, 0.0) + prefill_s
        self._num_pending[instance_id] = self._num_pending.get(instance_id, 0) + 1
        self._tokens[instance_id] = self._tokens.get(instance_id, 0) + output_tokens

    def prefill_done(self, request_id: str) -> int | None:
        """Stop counting the pending prefill; returns the request's node the first time."""
        flight = self._flights.get(request_id)
        if flight is None or flight.is_prefill_done:
            return None
        flight.is_prefill_done = True
        self._prefill_s[flight.instance_id] -= flight.prefill_s
        self._num_pending[flight.instance_id] -= 1
        flight.prefill_s = 0.0
        return flight.node

    def finished(self, request_id: str) -> None:
        self.prefill_done(request_id)
        flight = self._flights.pop(request_id, None)
        if flight is not None:
            self._tokens[flight.instance_id] -= flight.output_tokens

    def pending_prefill_s(self, instance_id: str) -> float:
        """Prefill time dispatched to the instance and not done: its queue, in seconds (the
        batch overhead is paid once, as queued prompts run together)."""
        if not self._num_pending.get(instance_id):
            return 0.0
        return max(0.0, self._prefill_s[instance_id]) + self.batch_overhead_s

    def pending(self, instance_ids: list[str]) -> list[float]:
        """``pending_prefill_s`` of each instance, in order."""
        count, total, overhead = self._num_pending.get, self._prefill_s, self.batch_overhead_s
        return [
            (total[iid] if total[iid] > 0.0 else 0.0) + overhead if count(iid) else 0.0
            for iid in instance_ids
        ]

    def output_tokens(self, instance_id: str) -> int:
        """Expected output tokens of the requests in flight on the instance (colocated)."""
        return self._tokens.get(instance_id, 0)

    def cost(self, instance_id: str, tpot_s: float) -> float:
        """Pending prefill + expected decode time of the work dispatched to the instance."""
        return self.pending_prefill_s(instance_id) + self._tokens.get(instance_id, 0) * tpot_s

    def check_consistency(self) -> None:
        for iid, total in self._prefill_s.items():
            expect = sum(f.prefill_s for f in self._flights.values() if f.instance_id == iid)
            assert abs(total - expect) < 1e-6, f"pending prefill time of {iid} drifted"
        for iid, tokens in self._tokens.items():
            expect_tokens = sum(
                f.output_tokens for f in self._flights.values() if f.instance_id == iid
            )
            assert tokens == expect_tokens, f"in-flight output tokens of {iid} drifted"
