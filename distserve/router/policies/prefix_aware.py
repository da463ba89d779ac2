"""Common base of the policies that keep a :class:`~distserve.router.prefix_index.PrefixIndex`.

Owns forwarding instance events into the index and registering instances lazily (an instance
first seen in a decision is added with its KV capacity as the index's claim limit). It does not
own any routing rule.
"""

from __future__ import annotations

from collections.abc import Sequence

from distserve.router.policies.base import InstanceLoad, RoutingPolicy
from distserve.router.prefix_index import PrefixIndex


class PrefixAwarePolicy(RoutingPolicy):
    """A routing policy with a prefix index fed by its own dispatches and by instance events."""

    def __init__(self, window_s: float = 180.0) -> None:
        super().__init__()
        self.index = PrefixIndex(window_s=window_s)
        self._known: set[str] = set()

    def add_instance(self, instance_id: str, role: str, total_kv_blocks: int | None = None) -> None:
        self.index.add_instance(instance_id, capacity_blocks=total_kv_blocks or None)
        self._known.add(instance_id)

    def remove_instance(self, instance_id: str) -> None:
        self.index.remove_instance(instance_id)
        self._known.discard(instance_id)

    def on_blocks_stored(self, instance_id: str, hashes: Sequence[int], now_s: float) -> None:
        if instance_id not in self._known:  # an event may precede the first decision
            self.add_instance(instance_id, "prefill")
        self.index.blocks_stored(instance_id, hashes, now_s)

    def on_blocks_evicted(self, instance_id: str, hashes: Sequence[int]) -> None:
        if instance_id in self._known:
            self.index.blocks_evicted(instance_id, hashes)

    def _ensure_known(self, instances: Sequence[InstanceLoad]) -> None:
        for inst in instances:
            if inst.instance_id not in self._known:
                self.add_instance(inst.instance_id, inst.role, inst.total_kv_blocks)

    def check_consistency(self) -> None:
        super().check_consistency()
        self.index.check_consistency()
        assert set(self.index.instances) == self._known, "index and policy disagree on instances"
