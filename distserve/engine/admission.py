"""Admission orders: in which order an instance's scheduler tries its waiting requests.

Owns the waiting set's *order* and the per-client accounting some orders need (deficits, virtual
counters). It does not own budgets, KV allocation or the queue's requests themselves: the engine
scheduler asks whether each candidate fits. Orders: ``fcfs``, ``lpm`` (longest prefix match),
``preble`` (Preble-like hit-ratio groups), ``dlpm`` (DLPM-like, ALGORITHMS.md §4), ``vtc``
(VTC-like virtual token counters, the locality-blind fairness baseline).

How the engine scheduler drives an order each step::

    order.add(WaitingItem(rid, client, arrival_s, num_prompt_tokens))    # on arrival
    for rid in order.order(match_len):        # match_len(rid) = cached prefix tokens now
        if not fits(rid): break               # or `continue` to try smaller ones
        admit(rid)
        order.on_admitted(rid, num_uncached_tokens)     # leaves the waiting set, charges
    order.on_output_tokens(client, n)          # as tokens are generated (dlpm, vtc charge them)
    order.remove(rid)                          # aborted while waiting

``order()`` is lazy and yields each waiting request at most once per call, so a consumer that
skips what does not fit always terminates. Requests re-added with ``is_resumed=True`` (preempted,
to be recomputed) come first, in FCFS order, and are not charged again.
"""

from __future__ import annotations

import heapq
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeVar

MatchLen = Callable[[str], int]


@dataclass(frozen=True)
class WaitingItem:
    """What an admission order knows about a waiting request."""

    request_id: str
    client_id: str
    arrival_s: float
    num_prompt_tokens: int


class AdmissionOrder(ABC):
    """The waiting set plus one ordering rule; subclasses implement ``_order``."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._items: dict[str, WaitingItem] = {}
        self._seq: dict[str, int] = {}  # tie-break: order of add()
        self._resumed: set[str] = set()
        self._num_added = 0
        self._num_waiting_of: dict[str, int] = {}  # client -> waiting requests

    def add(self, item: WaitingItem, *, is_resumed: bool = False) -> None:
        if item.request_id in self._items:
            raise ValueError(f"request {item.request_id} is already waiting")
        if self._num_waiting_of.get(item.client_id, 0) == 0:
            self._on_backlogged(item.client_id)
        self._items[item.request_id] = item
        self._seq[item.request_id] = self._num_added
        self._num_added += 1
        self._num_waiting_of[item.client_id] = self._num_waiting_of.get(item.client_id, 0) + 1
        if is_resumed:
            self._resumed.add(item.request_id)

    def remove(self, request_id: str) -> WaitingItem:
        """Take a request out of the waiting set (aborted, or admitted by the caller)."""
        item = self._items.pop(request_id, None)
        if item is None:
            raise KeyError(f"request {request_id} is not waiting")
        del self._seq[request_id]
        self._resumed.discard(request_id)
        self._num_waiting_of[item.client_id] -= 1
        return item

    def on_admitted(self, request_id: str, num_uncached_tokens: int) -> None:
        """The scheduler admitted ``request_id`` computing ``num_uncached_tokens`` prompt tokens."""
        was_resumed = request_id in self._resumed
        item = self.remove(request_id)
        if not was_resumed:
            self._charge_input(item, num_uncached_tokens)

    def on_output_tokens(self, client_id: str, num_tokens: int) -> None:  # noqa: B027
        """``num_tokens`` output tokens were generated for ``client_id``."""

    def order(self, match_len: MatchLen) -> Iterator[str]:
        """Request ids in the order to try them (see the module docstring)."""
        resumed = sorted(self._resumed, key=self._fcfs_key)
        yield from (rid for rid in resumed if rid in self._items)
        for rid in self._order(match_len):
            if rid in self._items and rid not in self._resumed:
                yield rid

    @abstractmethod
    def _order(self, match_len: MatchLen) -> Iterator[str]: ...

    def _charge_input(self, item: WaitingItem, num_uncached_tokens: int) -> None:  # noqa: B027
        """Hook: account an admission (fairness orders charge the client here)."""

    def _on_backlogged(self, client_id: str) -> None:  # noqa: B027
        """Hook: ``client_id`` had nothing waiting and now has a request."""

    def _fcfs_key(self, rid: str) -> tuple[float, int]:
        return (self._items[rid].arrival_s, self._seq[rid])

    def _fcfs(self) -> list[WaitingItem]:
        return sorted(self._items.values(), key=lambda it: self._fcfs_key(it.request_id))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._items

    def check_consistency(self) -> None:
        assert set(self._seq) == set(self._items), "tie-break keys drifted"
        assert self._resumed <= set(self._items), "a resumed request is not waiting"
        counts: dict[str, int] = {}
        for it in self._items.values():
            counts[it.client_id] = counts.get(it.client_id, 0) + 1
        assert counts == {c: k for c, k in self._num_waiting_of.items() if k}, (
            "client counts drifted"
        )


class FCFSOrder(AdmissionOrder):
    """Arrival order (ties: order of ``add``)."""

    name = "fcfs"

    def _order(self, match_len: MatchLen) -> Iterator[str]:
        for item in self._fcfs():
            yield item.request_id


class LPMOrder(AdmissionOrder):
    """Longest cached prefix first; ties in arrival order."""

    name = "lpm"

    def _order(self, match_len: MatchLen) -> Iterator[str]:
        heap = [(-match_len(rid), *self._fcfs_key(rid), rid) for rid in self._items]
        heapq.heapify(heap)
        while heap:
            yield heapq.heappop(heap)[-1]


class PrebleOrder(AdmissionOrder):
    """Preble-like: ``num_groups`` groups by cache-hit ratio, visited round-robin; a visit of
    group g admits up to ``(g+1) × per_group_quota`` requests and up to
    ``(g+1) × per_group_tokens`` uncached prompt tokens, FCFS inside the group.

    A visit ends when either quota is used up or its group has been offered entirely; a step
    that stops mid-visit resumes the same visit next step. One call visits each group once. A
    visit always admits its first request, however long, so no group starves.

    The token quota is what keeps the higher-hit groups' larger share a share of *compute*: with
    a request quota alone, a visit to the no-hit group could span as many steps as its quota has
    requests (a step's token budget fits one long uncached prompt), and every cache hit queued
    behind it waited for all of them.
    """

    name = "preble"

    def __init__(
        self, num_groups: int = 10, per_group_quota: int = 10, per_group_tokens: int = 512
    ) -> None:
        super().__init__()
        if min(num_groups, per_group_quota, per_group_tokens) < 1:
            raise ValueError(
                "num_groups, per_group_quota and per_group_tokens must be >= 1, got "
                f"{num_groups}, {per_group_quota}, {per_group_tokens}"
            )
        self.num_groups = num_groups
        self.per_group_quota = per_group_quota
        self.per_group_tokens = per_group_tokens
        self.current_group = 0
        self.admitted_in_visit = 0
        self.tokens_in_visit = 0
        self._group_of: dict[str, int] = {}

    def group(self, item: WaitingItem, num_cached_tokens: int) -> int:
        ratio = num_cached_tokens / item.num_prompt_tokens if item.num_prompt_tokens else 0.0
        return min(self.num_groups - 1, int(ratio * self.num_groups))

    def _visit_used_up(self, g: int) -> bool:
        return (
            self.admitted_in_visit >= (g + 1) * self.per_group_quota
            or self.tokens_in_visit >= (g + 1) * self.per_group_tokens
        )

    def _order(self, match_len: MatchLen) -> Iterator[str]:
        buckets: list[list[str]] = [[] for _ in range(self.num_groups)]
        self._group_of = {}
        for item in self._fcfs():
            g = self.group(item, match_len(item.request_id))
            self._group_of[item.request_id] = g
            buckets[g].append(item.request_id)
        for _ in range(self.num_groups):
            g = self.current_group
            for rid in buckets[g]:
                if self._visit_used_up(g):
                    break
                yield rid
            self.current_group = (g + 1) % self.num_groups
            self.admitted_in_visit = self.tokens_in_visit = 0

    def _charge_input(self, item: WaitingItem, num_uncached_tokens: int) -> None:
        if self._group_of.get(item.request_id) == self.current_group:
            self.admitted_in_visit += 1
            self.tokens_in_visit += num_uncached_tokens


class DLPMOrder(AdmissionOrder):
    """DLPM-like (ALGORITHMS.md §4): LPM order gated by per-client deficits.

    A pass offers, in LPM order, the requests whose client has a positive deficit; admitting
    charges ``w_in × uncached input tokens`` (generated tokens charge ``w_out`` each). When a
    pass admits nothing and requests remain, every backlogged client with deficit <= 0 gains
    ``quantum`` (repeatedly, until one of the remaining requests is eligible), and the next pass
    offers the rest. ``quantum = math.inf`` gives plain LPM. Deficits are divided by client weight.
    """

    name = "dlpm"

    def __init__(
        self,
        quantum: float = 2048.0,
        w_in: float = 1.0,
        w_out: float = 2.0,
        client_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if quantum <= 0:
            raise ValueError(f"quantum must be positive, got {quantum}")
        self.quantum = quantum
        self.w_in, self.w_out = w_in, w_out
        self.client_weights = dict(client_weights or {})
        self.deficit: dict[str, float] = {}
        self._num_admitted = 0

    def _order(self, match_len: MatchLen) -> Iterator[str]:
        keyed = sorted((-match_len(rid), *self._fcfs_key(rid), rid) for rid in self._items)
        remaining = [self._items[k[-1]] for k in keyed]
        while remaining:
            admitted_before = self._num_admitted
            deferred = []
            for item in remaining:
                if item.request_id not in self._items:
                    continue
                if self.deficit.get(item.client_id, 0.0) > 0:
                    yield item.request_id
                else:
                    deferred.append(item)
            deferred = [it for it in deferred if it.request_id in self._items]
            if deferred and self._num_admitted == admitted_before:
                self._refill({it.client_id for it in deferred})
            remaining = deferred

    def _refill(self, wanted: set[str]) -> None:
        backlogged = [c for c, k in self._num_waiting_of.items() if k > 0]
        while not any(self.deficit.get(c, 0.0) > 0 for c in wanted):
            for c in backlogged:
                if self.deficit.get(c, 0.0) <= 0:
                    self.deficit[c] = self.deficit.get(c, 0.0) + self.quantum

    def _charge_input(self, item: WaitingItem, num_uncached_tokens: int) -> None:
        self._num_admitted += 1
        w = self.client_weights.get(item.client_id, 1.0)
        self.deficit[item.client_id] = (
            self.deficit.get(item.client_id, 0.0) - self.w_in * num_uncached_tokens / w
        )

    def on_output_tokens(self, client_id: str, num_tokens: int) -> None:
        w = self.client_weights.get(client_id, 1.0)
        self.deficit[client_id] = self.deficit.get(client_id, 0.0) - self.w_out * num_tokens / w


class VTCOrder(AdmissionOrder):
    """VTC-like: the backlogged client with the smallest virtual counter goes next (its oldest
    request). Admission charges ``w_in ×`` *all* input tokens (VTC ignores locality), generated
    tokens ``w_out`` each, divided by the client's weight; a client that becomes backlogged is
    lifted to the smallest counter of the clients already backlogged."""

    name = "vtc"

    def __init__(
        self,
        w_in: float = 1.0,
        w_out: float = 2.0,
        client_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.w_in, self.w_out = w_in, w_out
        self.client_weights = dict(client_weights or {})
        self.counter: dict[str, float] = {}

    def _on_backlogged(self, client_id: str) -> None:
        others = [
            self.counter.get(c, 0.0)
            for c, k in self._num_waiting_of.items()
            if k > 0 and c != client_id
        ]
        if others:
            self.counter[client_id] = max(self.counter.get(client_id, 0.0), min(others))

    def _order(self, match_len: MatchLen) -> Iterator[str]:
        queues: dict[str, list[WaitingItem]] = {}
        for item in reversed(self._fcfs()):  # reversed: pop() takes the oldest
            queues.setdefault(item.client_id, []).append(item)
        while queues:
            client = min(
                queues,
                key=lambda c: (self.counter.get(c, 0.0), *self._fcfs_key(queues[c][-1].request_id)),
            )
            item = queues[client].pop()
            if not queues[client]:
                del queues[client]
            if item.request_id in self._items:
                yield item.request_id

    def _charge_input(self, item: WaitingItem, num_uncached_tokens: int) -> None:
        w = self.client_weights.get(item.client_id, 1.0)
        self.counter[item.client_id] = (
            self.counter.get(item.client_id, 0.0) + self.w_in * item.num_prompt_tokens / w
        )

    def on_output_tokens(self, client_id: str, num_tokens: int) -> None:
        w = self.client_weights.get(client_id, 1.0)
        self.counter[client_id] = self.counter.get(client_id, 0.0) + self.w_out * num_tokens / w


# ---------------------------------------------------------------- registry

_ORDERS: dict[str, type[AdmissionOrder]] = {
    cls.name: cls for cls in (FCFSOrder, LPMOrder, PrebleOrder, DLPMOrder, VTCOrder)
}
A = TypeVar("A", bound=type[AdmissionOrder])


def register_admission_order(cls: A) -> A:
    _ORDERS[cls.name] = cls
    return cls


def available_admission_orders() -> list[str]:
    return sorted(_ORDERS)


def make_admission_order(name: str, **options: object) -> AdmissionOrder:
    """A fresh admission order ``name``; unknown names or options raise ValueError."""
    cls = _ORDERS.get(name)
    if cls is None:
        raise ValueError(
            f"unknown admission order {name!r}; available: {available_admission_orders()}"
        )
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - params)
    if unknown:
        raise ValueError(
            f"admission order {name!r} has no option(s) {unknown}; options: {sorted(params)}"
        )
    return cls(**options)


__all__ = [
    "AdmissionOrder",
    "DLPMOrder",
    "FCFSOrder",
    "LPMOrder",
    "PrebleOrder",
    "VTCOrder",
    "WaitingItem",
    "available_admission_orders",
    "make_admission_order",
    "register_admission_order",
]
