"""Routing policies: one small interface (``base``), a registry, and the policies.

    from distserve.router.policies import make_policy, RouteRequest, InstanceLoad
    policy = make_policy("preble")          # or round_robin, least_load, cache_aware, d2lpm

The live router and ``placement.simulator`` drive the same objects; see ``base`` for the calls.
"""

from __future__ import annotations

from distserve.router.policies import cache_aware, d2lpm, preble, simple  # noqa: F401 - registers
from distserve.router.policies.base import (
    InstanceLoad,
    RouteRequest,
    RoutingPolicy,
    available_policies,
    make_policy,
    register_policy,
)

__all__ = [
    "InstanceLoad",
    "RouteRequest",
    "RoutingPolicy",
    "available_policies",
    "make_policy",
    "register_policy",
]
