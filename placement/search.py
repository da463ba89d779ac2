"""The placement search: DistServe's Algorithms 1 and 2, generalised to n:m pool ratios.

Owns choosing the best *unit* — ``n`` prefill × (tp, pp) + ``m`` decode × (tp, pp) — by per-GPU
goodput, and the best colocated instance. Sizing the whole cluster from the unit is in
``sizing.py``. The steps (ALGORITHMS.md §2):

1. Every (tp, pp) the model fits in (profile KV capacity) within the cluster's shape.
2. Per-phase goodput of one instance: prefill by TTFT attainment (prompts alone), decode by TPOT
   attainment (instant prefill, the KV transfer at the link's bandwidth included).
3. Candidate units — fast network (Algorithm 1): any (prefill cfg, n, decode cfg, m) within the
   GPU budget, the KV crossing the intra-node link when the unit fits in one node and the
   inter-node link otherwise; slow network (Algorithm 2): prefill and decode share the pipeline
   depth ``pp`` ≤ nodes, each node holds stage *s* of every instance of the unit
   (n·tp_p + m·tp_d ≤ GPUs per node) so the KV never leaves a node (each stage moves its share
   in parallel: bandwidth = intra-node × pp). Estimated goodput = min(n·g_p, m·g_d).
4. The ``top_k`` units by estimated goodput per GPU (and, when pp > 1 is searched, the best
   ``top_k // 2`` with pp = 1, which the engine can run) are simulated whole (prefill, transfer
   and decode together) and their goodput found by rate search on **joint** attainment; the
   best per GPU wins (ties: fewer GPUs).

``SearchRules`` switches each of our departures off to reproduce DistServe's public search:
1:1 pairs only, separate TTFT and TPOT checks, no transfer time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from placement.evaluate import INSTANT_BYTES_PER_S, Evaluator, PhaseConfig, Placement
from placement.goodput import GoodputResult
from placement.tasks import Task, TaskResult, run_tasks

NETWORKS = ("fast", "slow")


@dataclass(frozen=True)
class ClusterShape:
    gpus_per_node: int
    num_nodes: int

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.num_nodes < 1:
            raise ValueError(
                f"gpus per node and nodes must be >= 1, got {self.gpus_per_node} × {self.num_nodes}"
            )

    @property
    def num_gpus(self) -> int:
        return self.gpus_per_node * self.num_nodes


@dataclass(frozen=True)
class Links:
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float


@dataclass(frozen=True)
class SearchRules:
    ratios: bool = True  # n:m units; False: 1:1 pairs only
    joint: bool = True  # joint TTFT-and-TPOT attainment; False: each phase on its own
    transfer: bool = True  # KV transfer time from the link bandwidth; False: instant
    max_unit_instances: int = 6  # n + m of one unit
    top_k: int = 6  # units simulated whole

    @property
    def criterion(self) -> str:
        return "joint" if self.joint else "separate"


OUR_RULES = SearchRules()
DISTSERVE_RULES = SearchRules(ratios=False, joint=False, transfer=False)


@dataclass(frozen=True)
class Verified:
    """A unit simulated whole."""

    placement: Placement
    estimate_per_s: float  # min(n·g_p, m·g_d, link cap) from the per-phase searches
    goodput: GoodputResult  # simulated, on the rules' criterion
    link_cap_per_s: float = math.inf  # min(n, m) × link bytes/s ÷ mean KV bytes per request

    @property
    def rate_per_s(self) -> float:
        """The goodput: simulated, capped by what the KV links can carry (the simulator
        gives every transfer the whole link; this is where contention comes back in)."""
        return min(self.goodput.rate_per_s, self.link_cap_per_s)

    @property
    def per_gpu(self) -> float:
        return self.rate_per_s / self.placement.num_gpus


@dataclass
class SearchResult:
    best: Verified
    verified: list[Verified]  # best first
    prefill_goodput: dict[PhaseConfig, float] = field(default_factory=dict)
    decode_goodput: dict[tuple[PhaseConfig, float], float] = field(default_factory=dict)
    num_candidates: int = 0


def phase_configs(
    ev: Evaluator, shape: ClusterShape, network: str, max_pp: int
) -> list[PhaseConfig]:
    """Every (tp, pp) the model fits in, within the cluster's shape."""
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    if max_pp < 1:
        raise ValueError(f"max pp must be >= 1, got {max_pp}")
    pp_limit = shape.num_nodes if network == "slow" else shape.num_gpus
    out = []
    for tp in ev.model.tps:
        for pp in range(1, min(max_pp, pp_limit) + 1):
            if (
                tp <= shape.gpus_per_node
                and tp * pp <= shape.num_gpus
                and ev.model.kv_capacity(tp, pp)
            ):
                out.append(PhaseConfig(tp, pp))
    if not out:
        raise ValueError(
            f"{ev.model.name} fits no configuration on {shape.num_nodes} node(s) × "
            f"{shape.gpus_per_node} GPUs with pp <= {max_pp} (profiled TP: {ev.model.tps}; "
            "the KV capacity table has no entry for any of them)"
        )
    return out


def _units(
    configs: list[PhaseConfig], shape: ClusterShape, network: str, rules: SearchRules, links: Links
) -> list[tuple[PhaseConfig, int, PhaseConfig, int, float]]:
    """(prefill cfg, n, decode cfg, m, KV link bandwidth) of every candidate unit."""
    sizes = [(1, 1)]
    if rules.ratios:
        top = rules.max_unit_instances
        sizes = [
            (n, m) for n in range(1, top) for m in range(1, top + 1 - n) if math.gcd(n, m) == 1
        ]
    out = []
    for cp in configs:
        for cd in configs:
            for n, m in sizes:
                if network == "slow":
                    if cp.pp != cd.pp or n * cp.tp + m * cd.tp > shape.gpus_per_node:
                        continue
                    bw = links.intra_node_bytes_per_s * cp.pp
                else:
                    gpus = n * cp.num_gpus + m * cd.num_gpus
                    if gpus > shape.num_gpus:
                        continue
                    local = gpus <= shape.gpus_per_node
                    bw = links.intra_node_bytes_per_s if local else links.inter_node_bytes_per_s
                out.append((cp, n, cd, m, bw if rules.transfer else INSTANT_BYTES_PER_S))
    return out


def search_units(
    ev: Evaluator,
    shape: ClusterShape,
    links: Links,
    network: str = "fast",
    rules: SearchRules = OUR_RULES,
    max_pp: int = 1,
    progress: Callable[[str], None] | None = None,
    jobs: int = 1,
) -> SearchResult:
    """The best unit by per-GPU goodput (see the module docstring)."""
    configs = phase_configs(ev, shape, network, max_pp)
    units = _units(configs, shape, network, rules, links)
    if not units:
        raise ValueError(
            f"no prefill + decode pair of {[str(c) for c in configs]} fits "
            f"{shape.num_nodes} node(s) × {shape.gpus_per_node} GPUs"
        )
    prefill_cfgs = sorted({u[0] for u in units}, key=lambda c: (c.tp, c.pp))
    decode_keys = sorted({(u[2], u[4]) for u in units}, key=lambda k: (k[0].tp, k[0].pp, k[1]))
    tasks = [Task("prefill", f"prefill {c}", c, hint_rate=ev.prefill_hint(c)) for c in prefill_cfgs]
    tasks += [
        Task("decode", f"decode {c}", c, bytes_per_s=bw, hint_rate=ev.decode_hint(c))
        for c, bw in decode_keys
    ]
    done = run_tasks(ev, tasks, jobs, progress)
    g_p = {r.task.cfg: r.goodput.rate_per_s for r in done if r.task.kind == "prefill"}
    g_d = {
        (r.task.cfg, r.task.bytes_per_s): r.goodput.rate_per_s
        for r in done
        if r.task.kind == "decode"
    }
    kv_bytes = float(ev.workload.input_lens.mean()) * ev.model.kv_bytes_per_token
    ranked = []
    for cp, n, cd, m, bw in units:
        cap = min(n, m) * bw / kv_bytes  # the links carry the KV: one per instance
        est = min(n * g_p[cp], m * g_d[cd, bw], cap)  # type: ignore[index]
        if est > 0:
            p = Placement(cp, n, cd, m, transfer_bytes_per_s=bw)
            ranked.append((-est / p.num_gpus, p.num_gpus, str(p), p, est, cap))
    if not ranked:
        raise ValueError(
            f"no configuration of {ev.model.name} meets the SLOs (TTFT {ev.slo.ttft_s:g} s, "
            f"TPOT {ev.slo.tpot_s:g} s) at {ev.slo.attainment:.0%} even at a low rate"
        )
    ranked.sort(key=lambda t: t[:3])
    top = ranked[: rules.top_k]
    runnable = [t for t in ranked if t[3].prefill.pp == t[3].decode.pp == 1]  # type: ignore[union-attr]
    top += [t for t in runnable[: rules.top_k // 2] if t not in top]  # the YAML needs pp = 1
    tasks = [
        Task("unit", f"unit {name}", placement=p, hint_rate=est, criterion=rules.criterion)
        for _, _, name, p, est, _ in top
    ]
    verified = [
        Verified(t[3], t[4], r.goodput, t[5])
        for t, r in zip(top, run_tasks(ev, tasks, jobs, progress))
    ]
    verified.sort(key=lambda v: (-v.per_gpu, v.placement.num_gpus, str(v.placement)))
    if verified[0].rate_per_s <= 0:
        raise ValueError(
            f"no placement of {ev.model.name} meets both SLOs at {ev.slo.attainment:.0%} "
            "attainment when prefill and decode run together"
        )
    return SearchResult(verified[0], verified, g_p, g_d, len(units))  # type: ignore[arg-type]


def search_colocated(
    ev: Evaluator,
    shape: ClusterShape,
    rules: SearchRules = OUR_RULES,
    bounds: dict[int, float] | None = None,
    budgets: tuple[int, ...] = (2048, 512),
    progress: Callable[[str], None] | None = None,
    jobs: int = 1,
) -> tuple[Verified, int] | None:
    """The best single colocated instance (tp, pp = 1) per GPU and its chunked-prefill token
    budget; None when none meets the target at any rate.

    ``bounds[tp]`` is an upper bound on one instance's goodput: min(prefill-only, decode-only
    goodput) of that TP, from the disaggregated search — an instance doing both phases does no
    better than either alone. TPs are tried best bound first, each with the first budget, and
    skipped once their bound per GPU is below the best found; the winner then tries the others.
    """
    tps = [t for t in ev.model.tps if t <= shape.gpus_per_node and ev.model.kv_capacity(t, 1)]
    bounds = bounds or {}
    tps.sort(key=lambda t: -bounds.get(t, math.inf) / t)

    def task(tp: int, budget: int) -> Task:
        cfg = PhaseConfig(tp)
        hint = bounds.get(tp) or min(ev.prefill_hint(cfg), ev.decode_hint(cfg))
        p = Placement(colocated=cfg, num_colocated=1)
        label = f"colocated {cfg} budget {budget}"
        return Task("colocated", label, cfg, p, 0.0, 0.7 * hint, rules.criterion, budget)

    best: TaskResult | None = None

    def per_gpu(r: TaskResult) -> float:
        return r.goodput.rate_per_s / r.task.cfg.num_gpus  # type: ignore[union-attr]

    for tp in tps:
        if best is not None and bounds.get(tp, math.inf) / tp <= per_gpu(best):
            continue
        (r,) = run_tasks(ev, [task(tp, budgets[0])], 1, progress)
        if best is None or per_gpu(r) > per_gpu(best):
            best = r
    if best is None or best.goodput.rate_per_s <= 0:
        return None
    top_tp = best.task.cfg.tp  # type: ignore[union-attr]
    for r in run_tasks(ev, [task(top_tp, b) for b in budgets[1:]], jobs, progress):
        if per_gpu(r) > per_gpu(best):
            best = r
    assert best.task.placement is not None
    return Verified(best.task.placement, best.task.hint_rate, best.goodput), best.task.token_budget
