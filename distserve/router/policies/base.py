"""The routing-policy interface shared by the live router and the cluster simulator.

Owns the two boundary types (:class:`RouteRequest`, :class:`InstanceLoad`), the abstract
:class:`RoutingPolicy` with the dispatch-time load bookkeeping every policy shares, and the
registry (:func:`make_policy`). It does not own the request front, health checks or retries.

How a caller drives a policy (the live router and ``placement.simulator`` do exactly this)::

    policy = make_policy("preble", window_s=60.0)
    prefill_id = policy.choose_prefill(req, prefill_loads, now_s)   # records the dispatch
    ...   instance events, at any time:  policy.on_blocks_stored(iid, hashes, now_s)
    ...                                  policy.on_blocks_evicted(iid, hashes)
    policy.on_prefill_done(req.request_id, now_s, ttft_s)           # first token is out
    decode_id = policy.choose_decode(req, decode_loads, now_s)      # disaggregated only
    policy.on_finished(req.request_id, now_s)                       # always, also on abort/error

Every routed request must reach ``on_finished`` exactly once, or the load the policy attributes
to its instances never drains. Decisions are a pure function of the policy's state and the
arguments: ties go to the earliest entry of ``instances``.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

ROLES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may know about a request when routing it."""

    request_id: str
    client_id: str  # tenant / API key; fairness is per client
    num_prompt_tokens: int
    block_hashes: tuple[int, ...]  # chained hashes of the prompt's full blocks (block_hash.py)
    block_size: int  # tokens per block of those hashes
    expected_output_tokens: int  # an estimate (e.g. max_tokens or a predictor), >= 1
    arrival_s: float  # when the router received it (same clock as now_s)


@dataclass(frozen=True)
class InstanceLoad:
    """A snapshot of one instance, filled from instance stats (live) or simulator state.

    Policies keep their own dispatch-time counts of what they sent (see ``RoutingPolicy``), so a
    snapshot that lags a burst of dispatches does not send the whole burst to one instance.
    """

    instance_id: str
    role: str  # "prefill" | "decode" | "colocated"
    num_running: int = 0  # requests in the running batch
    num_waiting: int = 0  # requests queued (not yet admitted)
    num_waiting_tokens: int = 0  # prompt tokens queued and not yet computed
    free_kv_blocks: int = 0  # blocks allocatable now (free + evictable cached)
    total_kv_blocks: int = 0
    recent_tpot_s: float | None = None  # median TPOT over a recent window; None when unknown

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(
                f"instance {self.instance_id}: role must be one of {ROLES}, got {self.role!r}"
            )


@dataclass
class _Dispatch:
    prefill_id: str
    prefill_tokens: int
    decode_id: str | None = None
    decode_tokens: int = 0
    is_prefill_done: bool = False


class RoutingPolicy(ABC):
    """Chooses instances; subclasses implement ``select_prefill`` (and may override the rest).

    The base class counts, per instance, the requests and tokens dispatched to it that are not
    done yet (prefill: until ``on_prefill_done``; decode and colocated: until ``on_finished``),
    updated at dispatch time: ``outstanding_prefill_tokens(iid)`` and friends.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self._dispatches: dict[str, _Dispatch] = {}
        self._prefill_tokens: dict[str, int] = {}
        self._prefill_requests: dict[str, int] = {}
        self._decode_tokens: dict[str, int] = {}
        self._decode_requests: dict[str, int] = {}

    # ---- the decisions ---------------------------------------------------------------------
    def choose_prefill(
        self, req: RouteRequest, instances: Sequence[InstanceLoad], now_s: float
    ) -> str:
        """The instance that runs ``req``'s prefill (or the whole request, if colocated)."""
        if not instances:
            raise ValueError(f"no prefill instance available for request {req.request_id}")
        if req.request_id in self._dispatches:
            raise ValueError(f"request {req.request_id} was already routed")
        chosen = self.select_prefill(req, instances, now_s)
        assert any(i.instance_id == chosen for i in instances), (
            f"{self.name} chose unknown {chosen}"
        )
        self._dispatches[req.request_id] = _Dispatch(chosen, req.num_prompt_tokens)
        self._add(self._prefill_tokens, self._prefill_requests, chosen, req.num_prompt_tokens, 1)
        if _role_of(instances, chosen) == "colocated":
            self._assign_decode(
                req.request_id, chosen, req.num_prompt_tokens + req.expected_output_tokens
            )
        return chosen

    @abstractmethod
    def select_prefill(
        self, req: RouteRequest, instances: Sequence[InstanceLoad], now_s: float
    ) -> str:
        """Pick one of ``instances`` and record whatever the policy needs about the choice."""

    def choose_decode(
        self, req: RouteRequest, instances: Sequence[InstanceLoad], now_s: float
    ) -> str:
        """The decode instance: most free KV after what was already sent there, then fewest
        outstanding requests (DistServe's rule, corrected at dispatch time)."""
        if not instances:
            raise ValueError(f"no decode instance available for request {req.request_id}")
        if req.request_id not in self._dispatches:
            raise ValueError(f"request {req.request_id} has no prefill dispatch")

        # one pass, no key tuples (this runs once per request): the first instance with the
        # most free tokens, then the fewest outstanding requests
        bs, tokens, requests = req.block_size, self._decode_tokens, self._decode_requests
        chosen: str | None = None
        best_free = best_reqs = 0
        for inst in instances:
            iid = inst.instance_id
            free = min(inst.free_kv_blocks * bs, inst.total_kv_blocks * bs - tokens.get(iid, 0))
            if chosen is not None and free < best_free:
                continue
            n = requests.get(iid, 0)
            if chosen is None or free > best_free or n < best_reqs:
                chosen, best_free, best_reqs = iid, free, n
        assert chosen is not None
        self._assign_decode(
            req.request_id, chosen, req.num_prompt_tokens + req.expected_output_tokens
        )
        return chosen

    # ---- events ----------------------------------------------------------------------------
    def on_prefill_done(self, request_id: str, now_s: float, ttft_s: float | None = None) -> None:
        """The request's first token is out: its prefill no longer loads its prefill instance.

        ``ttft_s`` is None when the prefill ended without a first token (abort, failure)."""
        d = self._dispatches.get(request_id)
        if d is None or d.is_prefill_done:
            return
        d.is_prefill_done = True
        self._add(self._prefill_tokens, self._prefill_requests, d.prefill_id, -d.prefill_tokens, -1)

    def on_finished(self, request_id: str, now_s: float) -> None:
        """The request left the system (finished, aborted or failed)."""
        d = self._dispatches.get(request_id)
        if d is None:
            return
        if not d.is_prefill_done:
            self.on_prefill_done(request_id, now_s, None)
        if d.decode_id is not None:
            self._add(self._decode_tokens, self._decode_requests, d.decode_id, -d.decode_tokens, -1)
        del self._dispatches[request_id]

    def on_blocks_stored(self, instance_id: str, hashes: Sequence[int], now_s: float) -> None:  # noqa: B027 - optional hook
        """Instance event: these chained block hashes entered its prefix cache."""

    def on_blocks_evicted(self, instance_id: str, hashes: Sequence[int]) -> None:  # noqa: B027 - optional hook
        """Instance event: these chained block hashes left its prefix cache."""

    def add_instance(self, instance_id: str, role: str, total_kv_blocks: int | None = None) -> None:  # noqa: B027 - optional hook
        """An instance joined (optional: instances first seen in a decision are added lazily)."""

    def remove_instance(self, instance_id: str) -> None:  # noqa: B027 - optional hook
        """An instance left: forget what it held. Its requests still get ``on_finished``."""

    # ---- dispatch-time counts --------------------------------------------------------------
    def outstanding_prefill_tokens(self, instance_id: str) -> int:
        return self._prefill_tokens.get(instance_id, 0)

    def outstanding_prefill_requests(self, instance_id: str) -> int:
        return self._prefill_requests.get(instance_id, 0)

    def outstanding_decode_tokens(self, instance_id: str) -> int:
        return self._decode_tokens.get(instance_id, 0)

    def outstanding_decode_requests(self, instance_id: str) -> int:
        return self._decode_requests.get(instance_id, 0)

    def check_consistency(self) -> None:
        """Assert that the dispatch counts equal the sum over undone dispatches."""
        expect: dict[str, list[int]] = {}
        for d in self._dispatches.values():
            if not d.is_prefill_done:
                row = expect.setdefault(d.prefill_id, [0, 0, 0, 0])
                row[0] += d.prefill_tokens
                row[1] += 1
            if d.decode_id is not None:
                row = expect.setdefault(d.decode_id, [0, 0, 0, 0])
                row[2] += d.decode_tokens
                row[3] += 1
        for iid in set(expect) | set(self._prefill_tokens) | set(self._decode_tokens):
            got = [
                self.outstanding_prefill_tokens(iid),
                self.outstanding_prefill_requests(iid),
                self.outstanding_decode_tokens(iid),
                self.outstanding_decode_requests(iid),
            ]
            assert got == expect.get(iid, [0, 0, 0, 0]), f"{self.name}: counts of {iid} drifted"

    # ---- internals -------------------------------------------------------------------------
    def _assign_decode(self, request_id: str, instance_id: str, tokens: int) -> None:
        d = self._dispatches[request_id]
        assert d.decode_id is None, f"request {request_id} already has a decode instance"
        d.decode_id, d.decode_tokens = instance_id, tokens
        self._add(self._decode_tokens, self._decode_requests, instance_id, tokens, 1)

    @staticmethod
    def _add(
        tokens: dict[str, int], requests: dict[str, int], iid: str, n_tokens: int, n_reqs: int
    ) -> None:
        tokens[iid] = tokens.get(iid, 0) + n_tokens
        requests[iid] = requests.get(iid, 0) + n_reqs


def _role_of(instances: Sequence[InstanceLoad], instance_id: str) -> str:
    return next(i.role for i in instances if i.instance_id == instance_id)


# ---------------------------------------------------------------- registry

_POLICIES: dict[str, type[RoutingPolicy]] = {}
P = TypeVar("P", bound=type[RoutingPolicy])


def register_policy(cls: P) -> P:
    """Class decorator: make ``cls`` available to :func:`make_policy` under ``cls.name``."""
    if cls.name in _POLICIES and _POLICIES[cls.name] is not cls:
        raise ValueError(f"routing policy {cls.name!r} registered twice")
    _POLICIES[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def make_policy(name: str, **options: object) -> RoutingPolicy:
    """A fresh policy ``name`` with ``options``; unknown names or options raise ValueError."""
    cls = _POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; available: {available_policies()}")
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(params) - {"self"})
    if unknown:
        valid = sorted(set(params) - {"self"})
        raise ValueError(f"routing policy {name!r} has no option(s) {unknown}; options: {valid}")
    return cls(**options)
