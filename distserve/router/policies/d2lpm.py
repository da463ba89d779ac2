"""``d2lpm``: D²LPM-like routing — locality, load and fairness across instances.

ALGORITHMS.md §4 gives only the idea (a deficit per client at the router and per (client,
instance)); **the exact rules below are our design**, not the paper's. Instances are expected to
run the DLPM-like admission order (``distserve.engine.admission``), which keeps each instance
fair; this policy decides how far a client's requests may follow their cached prefixes.

State (all in tokens):

    load(i)   work sent to instance i and not done: uncached prompt tokens until the prefill is
              done, plus w_out × expected output until finished when i is colocated
    D[c]      router deficit of client c — deficit round robin over the whole cluster
    d[c, i]   locality deficit of client c on instance i

With ``cost_i(r)`` = uncached prompt tokens of r on i (+ ``w_out`` × expected output if i is
colocated), a request r of client c goes to:

1. ``best`` = the instance holding the longest prefix of r (ties: lower load, then list order);
2. **locality** — ``best`` if it holds >= ``min_match_blocks`` blocks of r, ``d[c, best] > 0``,
   and either ``best`` is not overloaded (``load > max(overload_ratio × mean, mean +
   overload_abs_tokens)``), or c has used up its cluster share this round (``D[c] <= 0``) and
   ``best`` is not saturated (the same test with ``saturate_ratio``): a client over its share
   stays with its cache instead of spreading onto other instances, so DLPM there caps it;
3. **spill** otherwise — the instance minimising ``load(i) + cost_i(r)`` (ties: longer match,
   then list order); the prefix is then cached there too.

Charges: ``D[c] −= uncached + w_out × expected output`` and ``d[c, chosen] −= cost_chosen(r)``.
Refills (deficit round robin at both levels): when every active client (requests in flight) has
``D <= 0``, each gets ``D += quantum_tokens``; when step 2 finds ``d[c, best] <= 0`` and every
client active on ``best`` has ``d <= 0``, each of those gets ``d += quantum_tokens`` — so a client
alone on an instance is never held back by its own deficit, and clients sharing a hot instance
share its locality. A client (or a client on an instance) that becomes active starts at one
quantum, as a DRR queue that empties forgets its deficit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distserve.router.policies.base import InstanceLoad, RouteRequest, register_policy
from distserve.router.policies.prefix_aware import PrefixAwarePolicy


@dataclass
class _Routed:
    client_id: str
    instance_id: str
    load_tokens: int  # added to load(instance) at dispatch
    held_until_finish: bool  # colocated: the load drains at finish, else at prefill done
    is_released: bool = False  # its load on the instance has drained


@register_policy
class D2LPMPolicy(PrefixAwarePolicy):
    name = "d2lpm"

    def __init__(
        self,
        quantum_tokens: int = 4096,
        overload_ratio: float = 1.5,
        saturate_ratio: float = 3.0,
        overload_abs_tokens: int = 2048,
        min_match_blocks: int = 1,
        w_out: float = 2.0,
    ) -> None:
        super().__init__()
        if quantum_tokens <= 0:
            raise ValueError(f"quantum_tokens must be positive, got {quantum_tokens}")
        self.quantum_tokens = quantum_tokens
        self.overload_ratio = overload_ratio
        self.saturate_ratio = saturate_ratio
        self.overload_abs_tokens = overload_abs_tokens
        self.min_match_blocks = min_match_blocks
        self.w_out = w_out
        self.router_deficit: dict[str, float] = {}
        self.local_deficit: dict[tuple[str, str], float] = {}
        self._load: dict[str, int] = {}
        self._active: dict[str, int] = {}  # client -> requests in flight
        self._active_on: dict[str, dict[str, int]] = {}  # instance -> client -> requests
        self._routed: dict[str, _Routed] = {}
        self.num_locality = 0
        self.num_spills = 0

    def load_tokens(self, instance_id: str) -> int:
        return self._load.get(instance_id, 0)

    def select_prefill(
        self, req: RouteRequest, instances: Sequence[InstanceLoad], now_s: float
    ) -> str:
        self._ensure_known(instances)
        c, bs, n = req.client_id, req.block_size, req.num_prompt_tokens
        matched = self.index.match(req.block_hashes)
        load = {i.instance_id: self._load.get(i.instance_id, 0) for i in instances}
        mean = sum(load.values()) / len(instances)

        def cost(inst: InstanceLoad) -> int:
            uncached = n - min(matched.get(inst.instance_id, 0) * bs, n)
            out = self.w_out * req.expected_output_tokens if inst.role == "colocated" else 0
            return int(uncached + out)

        def over(iid: str, ratio: float) -> bool:
            return load[iid] > max(ratio * mean, mean + self.overload_abs_tokens)

        if c not in self._active:
            self.router_deficit[c] = self.quantum_tokens
        best = min(instances, key=lambda i: (-matched.get(i.instance_id, 0), load[i.instance_id]))
        chosen: InstanceLoad | None = None
        if matched.get(best.instance_id, 0) >= self.min_match_blocks:
            b = best.instance_id
            allowed = not over(b, self.overload_ratio) or (
                self.router_deficit[c] <= 0 and not over(b, self.saturate_ratio)
            )
            if allowed and self._has_local_deficit(c, b):
                chosen = best
                self.num_locality += 1
        if chosen is None:
            chosen = min(
                instances,
                key=lambda i: (load[i.instance_id] + cost(i), -matched.get(i.instance_id, 0)),
            )
            self.num_spills += 1
        self._dispatch(req, chosen, cost(chosen), matched.get(chosen.instance_id, 0), now_s)
        return chosen.instance_id

    def _has_local_deficit(self, client: str, iid: str) -> bool:
        key = (client, iid)
        if self.local_deficit.setdefault(key, self.quantum_tokens) > 0:
            return True
        sharing = self._active_on.get(iid, {})
        if all(self.local_deficit.get((k, iid), 0.0) <= 0 for k in sharing):
            for k in {*sharing, client}:
                self.local_deficit[(k, iid)] = (
                    self.local_deficit.get((k, iid), 0.0) + self.quantum_tokens
                )
        return self.local_deficit[key] > 0

    def _dispatch(
        self, req: RouteRequest, inst: InstanceLoad, cost: int, matched: int, now_s: float
    ) -> None:
        c, iid = req.client_id, inst.instance_id
        uncached = req.num_prompt_tokens - min(matched * req.block_size, req.num_prompt_tokens)
        self.router_deficit[c] -= uncached + self.w_out * req.expected_output_tokens
        on_inst = self._active_on.setdefault(iid, {})
        if c not in on_inst:
            self.local_deficit[(c, iid)] = self.quantum_tokens
        self.local_deficit[(c, iid)] -= cost
        self._active[c] = self._active.get(c, 0) + 1
        on_inst[c] = on_inst.get(c, 0) + 1
        self._load[iid] = self._load.get(iid, 0) + cost
        self._routed[req.request_id] = _Routed(c, iid, cost, inst.role == "colocated")
        self.index.insert(iid, req.block_hashes, now_s)
        active = list(self._active)
        if all(self.router_deficit[k] <= 0 for k in active):
            for k in active:
                self.router_deficit[k] += self.quantum_tokens

    def on_prefill_done(self, request_id: str, now_s: float, ttft_s: float | None = None) -> None:
        r = self._routed.get(request_id)
        if r is not None and not r.held_until_finish:
            self._release_instance(r)
        super().on_prefill_done(request_id, now_s, ttft_s)

    def on_finished(self, request_id: str, now_s: float) -> None:
        super().on_finished(request_id, now_s)
        r = self._routed.pop(request_id, None)
        if r is None:
            return
        self._release_instance(r)
        self._active[r.client_id] -= 1
        if not self._active[r.client_id]:
            del self._active[r.client_id]

    def _release_instance(self, r: _Routed) -> None:
        if r.is_released:
            return
        r.is_released = True
        self._load[r.instance_id] -= r.load_tokens
        on_inst = self._active_on[r.instance_id]
        on_inst[r.client_id] -= 1
        if not on_inst[r.client_id]:
            del on_inst[r.client_id]

    def check_consistency(self) -> None:
        super().check_consistency()
        load: dict[str, int] = {}
        for r in self._routed.values():
            if not r.is_released:
                load[r.instance_id] = load.get(r.instance_id, 0) + r.load_tokens
        assert all(self._load.get(i, 0) == v for i, v in load.items()), "d2lpm load drifted"
        assert sum(self._active.values()) == len(self._routed), "d2lpm active counts drifted"
