"""Windowed load statistics of the ``preble`` policy (Preble E2-like, ALGORITHMS.md §3).

Owns, over a sliding window of ``window_s`` seconds: per (instance, important node) the prefill
cost charged by requests routed there and their count, per instance the total and the prefix
hit ratio, and the number of hot nodes. It does not own routing decisions (``preble.py``).

A *charge* is one request's contribution to one important node on one instance:
``miss × PrefillTime(node) / holders(node)`` with the holder count taken at dispatch time. The sum
of charges over the window is Preble's ``Σ_v miss_rate(v) · requests(v) · PrefillTime(v) /
holders(v)``, kept incrementally so a load query is O(1). Rebalancing moves a node's charges
from one instance to another.
"""

from __future__ import annotations

from collections import deque
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
        e, k = extend_tokens, context_tokens
        return self.a_s + self.b_s * e + self.c_s * k + self.d_s * e * k


class _Charge:
    __slots__ = ("cost_s", "instance_id", "node", "seq", "time_s")

    def __init__(self, seq: int, time_s: float, instance_id: str, node: int, cost_s: float) -> None:
        self.seq, self.time_s, self.instance_id, self.node, self.cost_s = (
            seq,
            time_s,
            instance_id,
            node,
            cost_s,
        )


class WindowedLoad:
    """Sliding-window prefill charges per (instance, node), hit ratios and hot-node counts."""

    def __init__(self, window_s: float, hot_min_requests: int = 2) -> None:
        self.window_s = window_s
        self.hot_min_requests = hot_min_requests
        self._charges: deque[_Charge] = deque()
        self._buckets: dict[str, dict[int, deque[_Charge]]] = {}
        self._bucket_cost: dict[str, dict[int, float]] = {}
        self._total: dict[str, float] = {}
        self._node_requests: dict[int, int] = {}
        self._num_hot = 0
        self._hot_on: dict[str, set[int]] = {}  # instance -> nodes with enough requests there
        self._seq = 0
        self._hits: deque[tuple[float, str, int, int]] = deque()
        self._hit_sums: dict[str, list[int]] = {}  # instance -> [cached tokens, prompt tokens]

    # ---- updates ---------------------------------------------------------------------------
    def charge(self, now_s: float, instance_id: str, node: int, cost_s: float) -> None:
        self._seq += 1
        c = _Charge(self._seq, now_s, instance_id, node, cost_s)
        self._charges.append(c)
        bucket = self._buckets.setdefault(instance_id, {}).setdefault(node, deque())
        bucket.append(c)
        if len(bucket) == self.hot_min_requests:
            self._hot_on.setdefault(instance_id, set()).add(node)
        costs = self._bucket_cost.setdefault(instance_id, {})
        costs[node] = costs.get(node, 0.0) + cost_s
        self._total[instance_id] = self._total.get(instance_id, 0.0) + cost_s
        self._count(node, +1)

    def record_hit(
        self, now_s: float, instance_id: str, cached_tokens: int, prompt_tokens: int
    ) -> None:
        self._hits.append((now_s, instance_id, cached_tokens, prompt_tokens))
        sums = self._hit_sums.setdefault(instance_id, [0, 0])
        sums[0] += cached_tokens
        sums[1] += prompt_tokens

    def expire(self, now_s: float) -> None:
        """Drop everything older than the window."""
        horizon = now_s - self.window_s
        while self._charges and self._charges[0].time_s < horizon:
            c = self._charges.popleft()
            bucket = self._buckets[c.instance_id][c.node]
            assert bucket[0] is c, "charges leave their bucket in dispatch order"
            bucket.popleft()
            if len(bucket) == self.hot_min_requests - 1:
                self._hot_on[c.instance_id].discard(c.node)
            self._bucket_cost[c.instance_id][c.node] -= c.cost_s
            self._total[c.instance_id] -= c.cost_s
            if not bucket:
                del self._buckets[c.instance_id][c.node]
                del self._bucket_cost[c.instance_id][c.node]
            self._count(c.node, -1)
        while self._hits and self._hits[0][0] < horizon:
            _, iid, cached, prompt = self._hits.popleft()
            self._hit_sums[iid][0] -= cached
            self._hit_sums[iid][1] -= prompt

    def move(self, node: int, src: str, dst: str) -> float:
        """Move ``node``'s charges from ``src`` to ``dst``; returns the cost moved."""
        bucket = self._buckets.get(src, {}).pop(node, None)
        if bucket is None:
            return 0.0
        cost = self._bucket_cost[src].pop(node)
        for c in bucket:
            c.instance_id = dst
        dst_buckets = self._buckets.setdefault(dst, {})
        merged = sorted([*dst_buckets.get(node, ()), *bucket], key=lambda c: c.seq)
        dst_buckets[node] = deque(merged)
        self._hot_on.get(src, set()).discard(node)
        if len(merged) >= self.hot_min_requests:
            self._hot_on.setdefault(dst, set()).add(node)
        dst_costs = self._bucket_cost.setdefault(dst, {})
        dst_costs[node] = dst_costs.get(node, 0.0) + cost
        self._total[src] -= cost
        self._total[dst] = self._total.get(dst, 0.0) + cost
        return cost

    # ---- queries ---------------------------------------------------------------------------
    def total(self, instance_id: str) -> float:
        return max(0.0, self._total.get(instance_id, 0.0))  # max: float round-off after expiry

    def hit_ratio(self, instance_id: str) -> float | None:
        """Cached / prompt tokens of requests routed to the instance in the window; None if none."""
        sums = self._hit_sums.get(instance_id)
        return sums[0] / sums[1] if sums and sums[1] > 0 else None

    def hot_nodes(self, instance_id: str) -> list[tuple[float, int]]:
        """``(cost, node)`` of nodes with >= ``hot_min_requests`` requests on the instance."""
        costs = self._bucket_cost.get(instance_id, {})
        return [(costs[n], n) for n in self._hot_on.get(instance_id, ())]

    def num_requests(self, node: int) -> int:
        """Requests through ``node`` in the window, over all instances."""
        return self._node_requests.get(node, 0)

    @property
    def num_hot_nodes(self) -> int:
        """Nodes with >= ``hot_min_requests`` requests in the window, over all instances."""
        return self._num_hot

    def _count(self, node: int, delta: int) -> None:
        before = self._node_requests.get(node, 0)
        after = before + delta
        if after:
            self._node_requests[node] = after
        else:
            del self._node_requests[node]
        k = self.hot_min_requests
        self._num_hot += (after >= k) - (before >= k)

    def check_consistency(self) -> None:
        totals: dict[str, float] = {}
        counts: dict[int, int] = {}
        for c in self._charges:
            assert c in self._buckets[c.instance_id][c.node], "charge missing from its bucket"
            totals[c.instance_id] = totals.get(c.instance_id, 0.0) + c.cost_s
            counts[c.node] = counts.get(c.node, 0) + 1
        for iid, total in self._total.items():
            assert abs(total - totals.get(iid, 0.0)) < 1e-6, f"total of {iid} drifted"
        assert counts == self._node_requests, "node request counts drifted"
        assert self._num_hot == sum(k >= self.hot_min_requests for k in counts.values())
        for iid, buckets in self._buckets.items():
            hot = {n for n, b in buckets.items() if len(b) >= self.hot_min_requests}
            assert hot == self._hot_on.get(iid, set()), f"hot nodes of {iid} drifted"
