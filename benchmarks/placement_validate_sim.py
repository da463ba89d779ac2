"""The simulator side of ``placement_validate.py``: the bench's own requests, and calibration.

``bench_workload`` rebuilds exactly what ``distserve bench --dataset random`` sent at one rate
(its lengths: ``workloads.random_lengths`` with the bench's seed; its arrival times: Gamma/
Poisson with seed + rate index). ``calibrated`` adds the serving stack's per-step overhead to
the profile's constant terms: the live median TTFT and TPOT minus the simulated ones at a rate
so low that nothing queues (router and gRPC hops, token streaming, the engine thread sharing its
core with the instance's gRPC server — none of which ``engine.step()`` timings contain).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from distserve.bench import workloads
from distserve.bench.arrivals import gamma_arrivals
from distserve.bench.workloads import WorkloadRequest
from placement.evaluate import SLO, Evaluator, PhaseConfig, Placement, SimSettings
from placement.latency_model import LatencyModel
from placement.profile_format import ModelProfile
from placement.simulator import InstanceSpec
from placement.workload import BLOCK_SIZE, Workload


def bench_lengths(
    input_len: int, output_len: int, range_ratio: float, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The lengths ``distserve bench --dataset random`` sends (its ``_random`` prompts)."""

    def span(x: int) -> tuple[int, int]:
        return max(1, int(x * (1 - range_ratio))), max(1, int(x * (1 + range_ratio)))

    reqs = workloads.random_lengths(
        num_requests=n,
        input_len_range=span(input_len),
        output_len_range=span(output_len),
        seed=seed,
    )
    return np.array([r.input_len for r in reqs]), np.array([r.output_len for r in reqs])


def bench_workload(lens: tuple[np.ndarray, np.ndarray], rate: float, arrival_seed: int) -> Workload:
    """The bench's requests at ``rate`` (stored at unit rate, as ``Workload`` keeps them)."""
    ins, outs = lens
    times = gamma_arrivals(len(ins), rate, cv=1.0, seed=arrival_seed)
    base, next_id = [], 0
    for k, (n_in, n_out, t) in enumerate(zip(ins.tolist(), outs.tolist(), times)):
        blocks = -(-n_in // BLOCK_SIZE)
        ids = tuple(range(next_id, next_id + blocks))
        base.append(WorkloadRequest(f"b{k}", t * rate, "c0", n_in, n_out, ids, BLOCK_SIZE))
        next_id += blocks
    return Workload("bench", tuple(base))


def simulate(
    model: ModelProfile,
    slo: SLO,
    settings: SimSettings,
    p: Placement,
    workload: Workload,
    rate: float,
) -> dict[str, float]:
    ev = Evaluator(model, workload, slo, settings)
    result = ev.run(p, rate)
    return {
        "attainment": ev.measure(result).joint,
        "p50_ttft_s": float(np.median(result.ttft_s)),
        "p50_tpot_s": float(np.median(result.tpot_s)),
    }


def calibrated(model: ModelProfile, prefill_ms: float, decode_ms: float) -> ModelProfile:
    """The profile with a fixed overhead added to every prefill and decode step."""

    def shift(c: tuple[float, float, float], ms: float) -> tuple[float, float, float]:
        return (c[0] + ms, c[1], c[2])

    configs = {
        k: replace(
            c,
            prefill=shift(c.prefill, prefill_ms),
            decode_small=shift(c.decode_small, decode_ms),
            decode_large=shift(c.decode_large, decode_ms),
        )
        for k, c in model.configs.items()
    }
    return replace(model, configs=configs)


def overheads(measured: dict[str, Any], simulated: dict[str, float]) -> tuple[float, float]:
    """(prefill, decode) per-step overhead in ms from a low-rate run; never negative."""
    ttft = measured["ttft_s"]["median"] - simulated["p50_ttft_s"]
    tpot = measured["tpot_s"]["median"] - simulated["p50_tpot_s"]
    return max(0.0, 1e3 * ttft), max(0.0, 1e3 * tpot)


# ---- the testbed model: the devices' cores are not the devices' alone ----------------------
@dataclass(frozen=True)
class HostLoad:
    """CPU that is not an engine thread's, per request, measured in a low-rate run.

    On this machine a "device" is a pinned core, and other work shares it: the router and the
    bench client (unpinned, so spread over every core) and each rank's own threads besides the
    engine thread (gRPC, transfers; pinned with it). While they run, the engine thread waits, so
    every step of that rank takes ``1 / (1 - share)`` times its profiled time, where ``share``
    is the fraction of the core the others use at the rate simulated (CPU per request × rate).
    """

    host_ms: float  # router + bench client CPU per request
    rank_other_ms: dict[str, float]  # per rank: its non-engine threads' CPU per request
    background: dict[str, float]  # cores used with no request in flight: "router", each rank
    num_cores: int = 2
    max_share: float = 0.5  # CFS: a runnable engine keeps at least about half its core

    @classmethod
    def measured(cls, cpu: dict[str, Any]) -> HostLoad:
        """From one run's ``cpu_use`` record: its CPU less the idle background over its wall
        time, per request (the bench client: its CPU while measuring, per measured request)."""
        idle, wall = cpu["idle_cpu_per_s"], cpu["wall_s"]
        n = max(1, cpu["num_requests"])
        router_ms = 1e3 * max(0.0, cpu["router_cpu_s"] - idle["router"] * wall) / n
        client_ms = 1e3 * cpu["client_measured_cpu_s"] / max(1, cpu["num_measured"])
        ranks = {k: v for k, v in cpu.items() if k.startswith("rank") and isinstance(v, dict)}
        other = {
            k: 1e3 * max(0.0, v["other_threads_ran_s"] - idle[k] * wall) / n
            for k, v in ranks.items()
        }
        return cls(host_ms=router_ms + client_ms, rank_other_ms=other, background=dict(idle))

    def slowdowns(
        self, ranks: list[str], rate: float, busy: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Step-time factor per rank at ``rate``.

        A rank's own other threads (pinned with it) always compete with its engine thread. The
        router and the client are not pinned: the scheduler runs them on a core that is idle
        when there is one, so they only take from the engines what the idle time left by
        ``busy`` (each rank's engine utilisation) cannot hold, evenly from every core. Without
        ``busy`` they are spread evenly over all cores."""
        host = self.background["router"] + rate * self.host_ms / 1e3  # cores
        other = {r: self.background[r] + rate * self.rank_other_ms[r] / 1e3 for r in ranks}
        if busy is None:
            spill = host / self.num_cores
        else:
            idle = sum(max(0.0, 1.0 - busy[r] - other[r]) for r in ranks)
            spill = max(0.0, host - idle) / self.num_cores
        return {r: 1.0 / (1.0 - min(self.max_share, other[r] + spill)) for r in ranks}


def scaled(lat: LatencyModel, factor: float) -> LatencyModel:
    def times(c: tuple[float, float, float]) -> tuple[float, float, float]:
        return (c[0] * factor, c[1] * factor, c[2] * factor)

    return replace(
        lat,
        prefill=times(lat.prefill),
        decode_small=times(lat.decode_small),
        decode_large=times(lat.decode_large),
        stage_overhead_ms=lat.stage_overhead_ms * factor,
    )


@dataclass
class SlowedEvaluator(Evaluator):
    """An evaluator whose instances of each role run ``slowdown[role]`` times slower."""

    slowdown: dict[str, float] = field(default_factory=dict)

    def instance(self, role: str, cfg: PhaseConfig) -> InstanceSpec:
        spec = super().instance(role, cfg)
        factor = self.slowdown.get(role, 1.0)
        return spec if factor == 1.0 else replace(spec, latency=scaled(spec.latency, factor))


def role_ranks(p: Placement) -> dict[str, list[str]]:
    """Which rank processes run each role (``LocalCluster`` starts prefill ranks, then decode,
    then colocated; one rank per instance at tp = pp = 1)."""
    out, k = {}, 0
    for role, cfg, num in (
        ("prefill", p.prefill, p.num_prefill),
        ("decode", p.decode, p.num_decode),
        ("colocated", p.colocated, p.num_colocated),
    ):
        if cfg is None or not num:
            continue
        size = cfg.tp * cfg.pp * num
        out[role] = [f"rank{i}" for i in range(k, k + size)]
        k += size
    return out


def simulate_testbed(
    model: ModelProfile,
    slo: SLO,
    settings: SimSettings,
    p: Placement,
    workload: Workload,
    rate: float,
    load: HostLoad,
    latency_offsets_s: tuple[float, float] = (0.0, 0.0),
    iterations: int = 3,
) -> dict[str, Any]:
    """The simulator with the testbed model: steps slowed by the CPU others take from each
    rank's core at ``rate`` (iterated with the simulated utilisation, see
    :meth:`HostLoad.slowdowns`); ``latency_offsets_s`` (TTFT, TPOT) are fixed costs outside the
    devices (router and gRPC hops), counted by tightening the SLOs by as much."""
    by_role = role_ranks(p)
    ranks = [r for rs in by_role.values() for r in rs]
    busy: dict[str, float] | None = None
    for _ in range(iterations):
        factors = load.slowdowns(ranks, rate, busy)
        slowdown = {role: sum(factors[r] for r in rs) / len(rs) for role, rs in by_role.items()}
        ev = SlowedEvaluator(model, workload, slo, settings, slowdown=slowdown)
        result = ev.run(p, rate)
        # instances and ranks come in the same order (ClusterSpec's, LocalCluster's)
        span = max(result.end_s, 1e-9)
        busy = {r: b / span for r, b in zip(ranks, result.busy_s.values(), strict=True)}
    d_ttft, d_tpot = latency_offsets_s
    tight = SLO(max(1e-9, slo.ttft_s - d_ttft), max(1e-9, slo.tpot_s - d_tpot), slo.attainment)
    return {
        "attainment": result.slo_attainment(tight.ttft_s, tight.tpot_s),
        "p50_ttft_s": float(np.median(result.ttft_s)) + d_ttft,
        "p50_tpot_s": float(np.median(result.tpot_s)) + d_tpot,
        "slowdown": slowdown,
    }
