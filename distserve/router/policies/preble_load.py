"""Load bookkeeping of the ``preble`` policy (Preble E2-like, ALGORITHMS.md §3).

Owns, over a sliding window of ``window_s`` seconds: per (instance, important node) the prefill
cost charged by requests routed there and their count, per instance the total and the prefix
hit ratio, and the number of hot nodes. It does not own routing decisions (``preble.py``).

A *charge* is one request's contribution to one important node on one instance:
``miss × PrefillTime(node) / holders(node)`` with the holder count taken at dispatch time. The sum
of charges over the window is Preble's ``Σ_v miss_rate(v) · requests(v) · PrefillTime(v) /
holders(v)``, kept incrementally so a load query is O(1). Rebalancing moves a node's charges
from one instance to another. :class:`InFlightLoad` counts the work dispatched and not yet done.
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
        self._hot_total: dict[str, float] = {}  # instance -> Σ cost of its hot nodes
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
        costs = self._bucket_cost.setdefault(instance_id, {})
        costs[node] = costs.get(node, 0.0) + cost_s
        if node in self._hot_on.get(instance_id, ()):
            self._hot_total[instance_id] += cost_s
        elif len(bucket) >= self.hot_min_requests:
            self._set_hot(instance_id, node, True)
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
            self._bucket_cost[c.instance_id][c.node] -= c.cost_s
            if c.node in self._hot_on.get(c.instance_id, ()):
                self._hot_total[c.instance_id] -= c.cost_s
                if len(bucket) < self.hot_min_requests:
                    self._set_hot(c.instance_id, c.node, False)
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
        if self._buckets.get(src, {}).get(node) is None:
            return 0.0
        if node in self._hot_on.get(src, ()):
            self._set_hot(src, node, False)
        bucket = self._buckets[src].pop(node)
        cost = self._bucket_cost[src].pop(node)
        for c in bucket:
            c.instance_id = dst
        dst_buckets = self._buckets.setdefault(dst, {})
        merged = sorted([*dst_buckets.get(node, ()), *bucket], key=lambda c: c.seq)
        dst_buckets[node] = deque(merged)
        dst_costs = self._bucket_cost.setdefault(dst, {})
        dst_costs[node] = dst_costs.get(node, 0.0) + cost
        if node in self._hot_on.get(dst, ()):
            self._hot_total[dst] += cost
        elif len(merged) >= self.hot_min_requests:
            self._set_hot(dst, node, True)
        self._total[src] -= cost
        self._total[dst] = self._total.get(dst, 0.0) + cost
        return cost

    def _set_hot(self, instance_id: str, node: int, is_hot: bool) -> None:
        cost = self._bucket_cost[instance_id][node]
        hot = self._hot_on.setdefault(instance_id, set())
        if is_hot:
            hot.add(node)
        else:
            hot.discard(node)
        self._hot_total[instance_id] = self._hot_total.get(instance_id, 0.0) + (
            cost if is_hot else -cost
        )

    # ---- queries ---------------------------------------------------------------------------
    def hot_total(self, instance_id: str) -> float:
        """Window cost of the instance's hot nodes (what rebalancing compares and moves)."""
        return max(0.0, self._hot_total.get(instance_id, 0.0))

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
            hot_cost = sum(self._bucket_cost[iid][n] for n in hot)
            assert abs(hot_cost - self._hot_total.get(iid, 0.0)) < 1e-6, (
                f"hot cost of {iid} drifted"
            )


class _Account:
    """In-flight cost of the requests under one node, as rebalancing accounts it to one
    instance. A move re-keys it, or merges it into the destination's account leaving a forward
    pointer, so requests that finish later drain the account their cost was moved to."""

    __slots__ = ("into", "key", "prefill_s", "tokens")

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.prefill_s = 0.0
        self.tokens = 0
        self.into: _Account | None = None

    def resolve(self) -> _Account:
        acc = self
        while acc.into is not None:
            acc = acc.into
        return acc


@dataclass
class _Flight:
    instance_id: str
    prefill_s: float  # pending prefill time; counted until the prefill is done
    output_tokens: int  # expected output; counted until finished (colocated instances)
    node: int | None  # the request's deepest important node (None: prompt has no full block)
    account: _Account | None
    is_prefill_done: bool = False


class InFlightLoad:
    """Work dispatched and not yet done, twice: per instance where it runs (``cost``, for routing)
    and per (instance, node) accounts that rebalancing may move (``account_cost``).

    A prefill-only instance is charged the request's pending ``PrefillTime``; a colocated one its
    expected output tokens (times the instance's TPOT when read), Preble's decode cost. Each
    request is accounted under its deepest important node.
    """

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}
        self._prefill_s: dict[str, float] = {}  # where the work runs
        self._tokens: dict[str, int] = {}
        self._accounts: dict[tuple[str, int], _Account] = {}
        self._acc_prefill_s: dict[str, float] = {}  # Σ accounts keyed to the instance
        self._acc_tokens: dict[str, int] = {}

    def add(
        self,
        request_id: str,
        instance_id: str,
        prefill_s: float,
        output_tokens: int,
        node: int | None,
    ) -> None:
        acc = None
        if node is not None:
            acc = self._accounts.get((instance_id, node))
            if acc is None:
                acc = self._accounts[(instance_id, node)] = _Account((instance_id, node))
            self._adjust(acc, prefill_s, output_tokens)
        self._flights[request_id] = _Flight(instance_id, prefill_s, output_tokens, node, acc)
        self._prefill_s[instance_id] = self._prefill_s.get(instance_id, 0.0) + prefill_s
        self._tokens[instance_id] = self._tokens.get(instance_id, 0) + output_tokens

    def prefill_done(self, request_id: str) -> int | None:
        """Stop counting the pending prefill; returns the request's node the first time."""
        flight = self._flights.get(request_id)
        if flight is None or flight.is_prefill_done:
            return None
        flight.is_prefill_done = True
        self._prefill_s[flight.instance_id] -= flight.prefill_s
        self._drain(flight, flight.prefill_s, 0)
        flight.prefill_s = 0.0
        return flight.node

    def finished(self, request_id: str) -> None:
        self.prefill_done(request_id)
        flight = self._flights.pop(request_id, None)
        if flight is not None:
            self._tokens[flight.instance_id] -= flight.output_tokens
            self._drain(flight, 0.0, flight.output_tokens)

    def cost(self, instance_id: str, tpot_s: float) -> float:
        """In-flight cost of the work running on the instance."""
        return self._prefill_s.get(instance_id, 0.0) + self._tokens.get(instance_id, 0) * tpot_s

    def account_cost(self, instance_id: str, tpot_s: float) -> float:
        """In-flight cost accounted to the instance (moved nodes included)."""
        return (
            self._acc_prefill_s.get(instance_id, 0.0)
            + self._acc_tokens.get(instance_id, 0) * tpot_s
        )

    def node_cost(self, instance_id: str, node: int, tpot_s: float) -> float:
        acc = self._accounts.get((instance_id, node))
        return 0.0 if acc is None else acc.prefill_s + acc.tokens * tpot_s

    def move(self, node: int, src: str, dst: str) -> None:
        """Account ``node``'s in-flight cost on ``src`` to ``dst`` from now on."""
        acc = self._accounts.pop((src, node), None)
        if acc is None:
            return
        prefill_s, tokens = acc.prefill_s, acc.tokens
        self._sum(src, -prefill_s, -tokens)
        target = self._accounts.get((dst, node))
        if target is None:
            acc.key = (dst, node)
            self._accounts[acc.key] = acc
            self._sum(dst, prefill_s, tokens)
        else:
            acc.prefill_s, acc.tokens, acc.into = 0.0, 0, target
            self._adjust(target, prefill_s, tokens)

    def _adjust(self, acc: _Account, prefill_s: float, tokens: int) -> None:
        acc.prefill_s += prefill_s
        acc.tokens += tokens
        self._sum(acc.key[0], prefill_s, tokens)

    def _sum(self, instance_id: str, prefill_s: float, tokens: int) -> None:
        self._acc_prefill_s[instance_id] = self._acc_prefill_s.get(instance_id, 0.0) + prefill_s
        self._acc_tokens[instance_id] = self._acc_tokens.get(instance_id, 0) + tokens

    def _drain(self, flight: _Flight, prefill_s: float, tokens: int) -> None:
        if flight.account is None:
            return
        acc = flight.account.resolve()
        self._adjust(acc, -prefill_s, -tokens)
        if acc.tokens <= 0 and acc.prefill_s <= 1e-12 and self._accounts.get(acc.key) is acc:
            del self._accounts[acc.key]

    def check_consistency(self) -> None:
        for iid, total in self._prefill_s.items():
            expect = sum(f.prefill_s for f in self._flights.values() if f.instance_id == iid)
            assert abs(total - expect) < 1e-6, f"pending prefill time of {iid} drifted"
        for iid, tokens in self._tokens.items():
            expect_tokens = sum(
                f.output_tokens for f in self._flights.values() if f.instance_id == iid
            )
            assert tokens == expect_tokens, f"in-flight output tokens of {iid} drifted"
        for iid, total in self._acc_prefill_s.items():
            expect = sum(a.prefill_s for a in self._accounts.values() if a.key[0] == iid)
            assert abs(total - expect) < 1e-6, f"accounted prefill time of {iid} drifted"
