"""``make_plan``: profile + workload + SLOs + cluster shape → a placement, its prediction, and
the best colocated alternative.

Owns the order of the planning steps and what a plan records; each step lives in its own
module (``search.py``, ``sizing.py``, ``evaluate.py``). Writing the YAML, the report and the
plot is ``output.py``. The engine runs pp = 1 only, so a plan with pp > 1 (``max_pp`` > 1) is
reported, and the YAML is written for the best pp = 1 plan next to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from placement.evaluate import SLO, Evaluator, Placement, SimSettings
from placement.profile_format import HardwareProfile
from placement.search import (
    OUR_RULES,
    ClusterShape,
    Links,
    SearchResult,
    SearchRules,
    Verified,
    search_colocated,
    search_units,
)
from placement.sizing import Layout, Sized, rank_layout, size_cluster
from placement.workload import Workload


@dataclass
class Plan:
    model_name: str
    slo: SLO
    shape: ClusterShape
    network: str
    rules: SearchRules
    settings: SimSettings
    workload: dict[str, float | int | str]
    search: SearchResult
    chosen: Sized  # the whole cluster (pp = 1: what the YAML runs)
    unit: Verified  # the unit it was sized from
    best_any_pp: Sized | None  # when a pp > 1 plan beats the runnable one
    colocated: Sized | None  # the best colocated cluster on as many GPUs
    colocated_unit: Verified | None
    colocated_budget: int
    layout: Layout
    distribution: dict[str, float]  # the chosen cluster at its predicted goodput
    num_simulations: int = 0
    planning_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def _size_best(
    res: SearchResult,
    candidates: list[Verified],
    shape: ClusterShape,
    network: str,
    rate: float | None,
    gpus: int | None,
    cross_node_link_per_s: float,
) -> tuple[Sized, Verified]:
    """Size each verified unit; for a rate keep the fewest GPUs, else the most goodput."""
    sized: list[tuple[Sized, Verified]] = []
    errors: list[str] = []
    for v in candidates:
        if v.rate_per_s <= 0:
            continue
        p = v.placement
        g_p = res.prefill_goodput[p.prefill]  # type: ignore[index]
        g_d = res.decode_goodput[p.decode, p.transfer_bytes_per_s]  # type: ignore[index]
        try:
            sized.append(
                (size_cluster(v, g_p, g_d, shape, network, rate, gpus, cross_node_link_per_s), v)
            )
        except ValueError as exc:
            errors.append(str(exc))
    if not sized:
        raise ValueError(errors[0] if errors else "no placement meets the target at any rate")
    if rate is not None:
        return min(sized, key=lambda s: (s[0].placement.num_gpus, -s[0].predicted_rate_per_s))
    return max(sized, key=lambda s: (s[0].predicted_rate_per_s, -s[0].placement.num_gpus))


def make_plan(
    profile: HardwareProfile,
    model_name: str,
    workload: Workload,
    slo: SLO,
    shape: ClusterShape,
    network: str = "fast",
    rate: float | None = None,
    gpus: int | None = None,
    rules: SearchRules = OUR_RULES,
    settings: SimSettings | None = None,
    max_pp: int = 1,
    links: Links | None = None,
    progress: Callable[[str], None] | None = None,
    jobs: int = 1,
) -> Plan:
    """Plan a cluster (see the module docstring). ValueError names what is wrong."""
    t0 = time.perf_counter()
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 req/s, got {rate}")
    if gpus is not None and not 1 <= gpus <= shape.num_gpus:
        raise ValueError(f"--gpus must be in [1, {shape.num_gpus}] (the cluster), got {gpus}")
    model = profile.model(model_name)
    settings = settings or SimSettings()
    links = links or Links(profile.intra_node_bytes_per_s, profile.inter_node_bytes_per_s)
    ev = Evaluator(model, workload, slo, settings)
    res = search_units(ev, shape, links, network, rules, max_pp, progress, jobs)
    kv_bytes = float(workload.input_lens.mean()) * model.kv_bytes_per_token
    cross = links.inter_node_bytes_per_s / kv_bytes if rules.transfer else math.inf
    runnable = [v for v in res.verified if _max_pp(v.placement) == 1]
    notes = []
    best_any = None
    if not runnable:
        raise ValueError(
            "every placement the search kept needs pipeline parallelism, which the engine "
            "cannot run yet; plan with --max-pp 1"
        )
    chosen, unit = _size_best(res, runnable, shape, network, rate, gpus, cross)
    if _max_pp(res.best.placement) > 1:
        best_any, _ = _size_best(res, [res.best], shape, network, rate, gpus, cross)
        notes.append(
            f"the best plan uses pipeline parallelism ({best_any.placement}, "
            f"{best_any.per_gpu:.3f} req/s per GPU); the YAML holds the best pp = 1 plan"
        )
    colocated, coloc_unit, coloc_budget = None, None, settings.colocated_token_budget
    bounds = {
        c.tp: min(g, max(v for (d, _), v in res.decode_goodput.items() if d == c))
        for c, g in res.prefill_goodput.items()
        if c.pp == 1 and any(d == c for d, _ in res.decode_goodput)
    }
    best_coloc = search_colocated(ev, shape, rules, bounds, progress=progress, jobs=jobs)
    if best_coloc is not None:
        coloc_unit, coloc_budget = best_coloc
        cfg = coloc_unit.placement.colocated
        assert cfg is not None
        count = max(1, chosen.placement.num_gpus // cfg.num_gpus)
        colocated = Sized(
            Placement(colocated=cfg, num_colocated=count),
            count * coloc_unit.rate_per_s,
            "instances × one instance's goodput",
        )
    if colocated is not None and colocated.predicted_rate_per_s > chosen.predicted_rate_per_s:
        notes.append(
            f"the colocated alternative ({colocated.placement}, {colocated.predicted_rate_per_s:.2f}"
            f" req/s) is predicted to beat the disaggregated plan ({chosen.predicted_rate_per_s:.2f}"
            " req/s) on these GPUs: write it with --colocated-out and prefer it"
        )
    layout = rank_layout(chosen.placement, shape.gpus_per_node)
    if layout.straddling:
        notes.append(
            "ranks of " + ", ".join(layout.straddling) + " span two nodes under the YAML's "
            "role-by-role rank order; their tensor-parallel traffic would cross the network"
        )
    if network == "slow" and chosen.placement.num_gpus > shape.gpus_per_node:
        notes.append(
            "slow network: the plan keeps each prefill/decode pair inside a node, but the "
            "router picks decode instances cluster-wide; it needs node affinity to honour it"
        )
    dist = ev.distribution(chosen.placement, max(chosen.predicted_rate_per_s, 1e-3))
    return Plan(
        model_name=model_name,
        slo=slo,
        shape=shape,
        network=network,
        rules=rules,
        settings=settings,
        workload=workload.summary(),
        search=res,
        chosen=chosen,
        unit=unit,
        best_any_pp=best_any,
        colocated=colocated,
        colocated_unit=coloc_unit,
        colocated_budget=coloc_budget,
        layout=layout,
        distribution=dist,
        num_simulations=ev.num_simulations,
        planning_s=time.perf_counter() - t0,
        notes=notes,
    )


def _max_pp(p: Placement) -> int:
    cfgs = [c for c in (p.prefill, p.decode, p.colocated) if c is not None]
    return max(c.pp for c in cfgs)
