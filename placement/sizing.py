"""From the best unit to a whole cluster: how many instances, and which node each rank is on.

Owns sizing (Algorithm 1's ``n = ceil(R / g_p), m = ceil(R / g_d)``, generalised) and the rank
layout the cluster YAML implies. It does not search (``search.py``).

- fast network: instances of the unit's prefill and decode configurations are added one at a
  time, always to the bottleneck phase (lower ``count × per-instance goodput``), until the rate
  is met (``rate``) or the GPU budget is spent (``gpus``). Predicted goodput =
  ``η × min(n·g_p, m·g_d)`` where ``η`` = the unit's simulated joint goodput / its estimate
  (the share lost when the phases' misses fall on different requests, and to KV transfer).
- slow network: whole units, each on its own group of ``pp`` nodes (several per node when they
  fit), so that the KV of every pair stays inside a node; predicted = units × unit goodput.

The YAML assigns ranks role by role (every prefill instance, then decode, then colocated) and
``torchrun`` puts rank ``r`` on node ``r // gpus_per_node``; ``rank_layout`` shows the result and
names any instance whose ranks would straddle two nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from placement.evaluate import PhaseConfig, Placement
from placement.search import ClusterShape, Verified


@dataclass(frozen=True)
class Sized:
    placement: Placement
    predicted_rate_per_s: float
    note: str = ""

    @property
    def per_gpu(self) -> float:
        return self.predicted_rate_per_s / self.placement.num_gpus


def size_cluster(
    unit: Verified,
    g_prefill: float,
    g_decode: float,
    shape: ClusterShape,
    network: str,
    rate: float | None = None,
    gpus: int | None = None,
    cross_node_link_per_s: float = math.inf,
) -> Sized:
    """The whole cluster for ``rate`` (fewest GPUs) or for ``gpus`` (most goodput).

    ``cross_node_link_per_s``: requests/s one instance's inter-node link carries; a fast-network
    cluster larger than a node routes KV across nodes, so its link cap is the lower of the two."""
    budget = shape.num_gpus if gpus is None else gpus
    if budget < unit.placement.num_gpus and rate is None:
        raise ValueError(f"--gpus {budget} is fewer than the best unit's {unit.placement.num_gpus}")
    if network == "slow":
        return _size_units(unit, shape, rate, budget)
    p = unit.placement
    assert p.prefill is not None and p.decode is not None
    eta = unit.rate_per_s / unit.estimate_per_s if unit.estimate_per_s > 0 else 1.0
    eta = min(eta, 1.0)  # pools larger than the unit's: no credit for more multiplexing
    unit_link = unit.link_cap_per_s / min(p.num_prefill, p.num_decode)  # per instance
    n, m = 1, 1

    def used(n: int, m: int) -> int:
        return n * p.prefill.num_gpus + m * p.decode.num_gpus  # type: ignore[union-attr]

    def predicted(n: int, m: int) -> float:
        link = unit_link
        if used(n, m) > shape.gpus_per_node:
            link = min(link, cross_node_link_per_s)
        return eta * min(n * g_prefill, m * g_decode, min(n, m) * link)

    while rate is None or predicted(n, m) < rate:
        add_prefill = n * g_prefill <= m * g_decode
        nn, mm = (n + 1, m) if add_prefill else (n, m + 1)
        if used(nn, mm) > budget:
            break
        n, m = nn, mm
    if rate is not None and predicted(n, m) < rate:
        raise ValueError(
            f"rate {rate:g} req/s needs more than the {budget} GPUs available: "
            f"{n}×P({p.prefill}) + {m}×D({p.decode}) reach {predicted(n, m):.2f} req/s"
        )
    sized = replace(p, num_prefill=n, num_decode=m)
    return Sized(sized, predicted(n, m), f"η = {eta:.3f} (unit joint goodput / estimate)")


def _size_units(unit: Verified, shape: ClusterShape, rate: float | None, budget: int) -> Sized:
    p = unit.placement
    assert p.prefill is not None and p.decode is not None
    per_node = p.num_prefill * p.prefill.tp + p.num_decode * p.decode.tp
    pp = p.prefill.pp
    max_units = (shape.num_nodes // pp) * (shape.gpus_per_node // per_node)
    max_units = min(max_units, budget // p.num_gpus)
    goodput = unit.rate_per_s
    if rate is None:
        k = max_units
    else:
        k = max(1, math.ceil(rate / goodput))
        if k > max_units:
            raise ValueError(
                f"rate {rate:g} req/s needs {k} units of {p} ({k * p.num_gpus} GPUs); "
                f"the cluster holds {max_units}"
            )
    if k < 1:
        raise ValueError(f"the unit {p} does not fit in {budget} GPUs")
    sized = replace(p, num_prefill=k * p.num_prefill, num_decode=k * p.num_decode)
    return Sized(sized, k * goodput, f"{k} unit(s) of {p}, each inside one node group")


@dataclass(frozen=True)
class Layout:
    nodes: tuple[tuple[str, ...], ...]  # per node: "prefill-0 (ranks 0-1)" ...
    straddling: tuple[str, ...]  # instances whose ranks span two nodes


def rank_layout(p: Placement, gpus_per_node: int) -> Layout:
    """Which node each instance lands on under the YAML's role-by-role rank order."""
    groups: list[tuple[str, PhaseConfig, int]] = []
    if p.colocated is not None:
        groups.append(("colocated", p.colocated, p.num_colocated))
    else:
        assert p.prefill is not None and p.decode is not None
        groups += [("prefill", p.prefill, p.num_prefill), ("decode", p.decode, p.num_decode)]
    num_nodes = -(-p.num_gpus // gpus_per_node)
    nodes: list[list[str]] = [[] for _ in range(num_nodes)]
    straddling, rank = [], 0
    for role, cfg, count in groups:
        for i in range(count):
            first, last = rank, rank + cfg.num_gpus - 1
            name = f"{role}-{i} ({cfg}, ranks {first}-{last})"
            nodes[first // gpus_per_node].append(name)
            if first // gpus_per_node != last // gpus_per_node and cfg.pp == 1:
                straddling.append(name)
            rank = last + 1
    return Layout(tuple(tuple(n) for n in nodes), tuple(straddling))
