"""Arrival processes: when each request of a workload is sent.

Owns seeded arrival-time generators (Poisson, Gamma with a chosen coefficient of variation) and
helpers that put arrival times on a list of requests or rescale a trace to a target rate. It does
not own request contents (``workloads.py``) or sending (the ``distserve bench`` client).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from distserve.bench.workloads import WorkloadRequest


def poisson_arrivals(num_requests: int, rate_per_s: float, seed: int = 0) -> list[float]:
    """Arrival times (s, first at 0) of a Poisson process of ``rate_per_s``."""
    return gamma_arrivals(num_requests, rate_per_s, cv=1.0, seed=seed)


def gamma_arrivals(
    num_requests: int, rate_per_s: float, cv: float = 1.0, seed: int = 0
) -> list[float]:
    """Arrival times whose gaps are Gamma distributed with mean 1/rate and the given CV.

    ``cv = 1`` is Poisson; ``cv > 1`` is burstier; ``cv < 1`` more regular.
    """
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be positive, got {rate_per_s}")
    if cv <= 0:
        raise ValueError(f"cv must be positive, got {cv}")
    if num_requests <= 0:
        return []
    shape = 1.0 / (cv * cv)
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate_per_s * shape), size=num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


ARRIVALS: dict[str, Callable[..., list[float]]] = {
    "poisson": poisson_arrivals,
    "gamma": gamma_arrivals,
}


def with_arrivals(
    requests: Sequence[WorkloadRequest], arrival_s: Sequence[float]
) -> list[WorkloadRequest]:
    """The requests, in order, with the given arrival times."""
    if len(arrival_s) != len(requests):
        raise ValueError(f"{len(arrival_s)} arrival times for {len(requests)} requests")
    return [replace(r, arrival_s=float(t)) for r, t in zip(requests, arrival_s)]


def rescale_to_rate(
    requests: Sequence[WorkloadRequest], rate_per_s: float
) -> list[WorkloadRequest]:
    """Stretch or squeeze a trace's timestamps so its mean rate is ``rate_per_s`` (shape kept)."""
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be positive, got {rate_per_s}")
    if len(requests) < 2:
        return list(requests)
    start = min(r.arrival_s for r in requests)
    span = max(r.arrival_s for r in requests) - start
    if span <= 0:
        raise ValueError("cannot rescale a trace whose requests all arrive at once")
    factor = (len(requests) - 1) / rate_per_s / span
    return [replace(r, arrival_s=(r.arrival_s - start) * factor) for r in requests]
