"""Locality-blind baselines: ``round_robin`` and ``least_load``.

Owns the two policies every prefix-aware policy is compared against. Neither keeps a prefix
index; both see only the dispatch-time counts of the base class.
"""

from __future__ import annotations

from collections.abc import Sequence

from distserve.router.policies.base import (
    InstanceLoad,
    RouteRequest,
    RoutingPolicy,
    register_policy,
)


@register_policy
class RoundRobinPolicy(RoutingPolicy):
    """Instances in turn, in the order the caller lists them (data-parallel SGLang's default)."""

    name = "round_robin"

    def __init__(self) -> None:
        super().__init__()
        self._num_routed = 0

    def select_prefill(
        self, req: RouteRequest, instances: Sequence[InstanceLoad], now_s: float
    ) -> str:
        chosen = instances[self._num_routed % len(instances)].instance_id
        self._num_routed += 1
        return chosen


@register_policy
class LeastLoadPolicy(RoutingPolicy):
    """Fewest outstanding prompt tokens dispatched here and not yet prefilled, then fewest
    outstanding requests (counted at dispatch time, so bursts spread out)."""

    name = "least_load"

    def select_prefill(
        self, req: RouteRequest, instances: Sequence[InstanceLoad], now_s: float
    ) -> str:
        return min(
            instances,
            key=lambda i: (
                self.outstanding_prefill_tokens(i.instance_id),
                self.outstanding_prefill_requests(i.instance_id),
            ),
        ).instance_id
