"""``cache_aware``: an SGLang-router-like rule (ALGORITHMS.md §3), over block hashes.

Owns the three-way rule of SGLang's cache-aware router, reconstructed from its documented
behaviour (call it SGLang-like):

1. **Imbalanced** — if ``max load − min load > balance_abs_threshold`` and
   ``max load > balance_rel_threshold × min load`` (load = requests dispatched to an instance and
   not yet prefilled, counted at dispatch time), route to the least loaded instance;
2. otherwise, if the longest cached prefix covers more than ``cache_threshold`` of the prompt,
   route to the instance holding it (ties: lower load);
3. otherwise route to the instance with the smallest tree (fewest indexed blocks; ties: lower load).

SGLang keeps an approximate per-worker radix tree of routed text; here the tree is the shared
block-hash :class:`PrefixIndex`, fed by dispatches and corrected by instance events.
"""

from __future__ import annotations

from collections.abc import Sequence

from distserve.router.policies.base import InstanceLoad, RouteRequest, register_policy
from distserve.router.policies.prefix_aware import PrefixAwarePolicy


@register_policy
class CacheAwarePolicy(PrefixAwarePolicy):
    name = "cache_aware"

    def __init__(
        self,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
    ) -> None:
        super().__init__()
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def select_prefill(
        self, req: RouteRequest, instances: Sequence[InstanceLoad], now_s: float
    ) -> str:
        self._ensure_known(instances)
        load = {i.instance_id: self.outstanding_prefill_requests(i.instance_id) for i in instances}
        max_load, min_load = max(load.values()), min(load.values())
        if (
            max_load - min_load > self.balance_abs_threshold
            and max_load > self.balance_rel_threshold * min_load
        ):
            chosen = min(instances, key=lambda i: load[i.instance_id]).instance_id
        else:
            matched = self.index.match(req.block_hashes)
            best = min(
                instances, key=lambda i: (-matched.get(i.instance_id, 0), load[i.instance_id])
            )
            best_tokens = matched.get(best.instance_id, 0) * req.block_size
            if best_tokens > self.cache_threshold * req.num_prompt_tokens:
                chosen = best.instance_id
            else:
                chosen = min(
                    instances,
                    key=lambda i: (self.index.num_blocks(i.instance_id), load[i.instance_id]),
                ).instance_id
        self.index.insert(chosen, req.block_hashes, now_s)
        return chosen
