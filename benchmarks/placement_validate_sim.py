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
    slowdown: dict[str, float] | None = None,
) -> dict[str, float]:
    """Attainment and medians of ``p`` at ``rate``; ``slowdown``: per role, steps that many
    times the profile's (see :class:`SharedCoresEvaluator`)."""
    ev = SharedCoresEvaluator(model, workload, slo, settings, slowdown=dict(slowdown or {}))
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


# ---- cores shared with the serving stack -------------------------------------------------------
def scaled(lat: LatencyModel, factor: float) -> LatencyModel:
    """``lat`` with every step ``factor`` times longer."""

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
class SharedCoresEvaluator(Evaluator):
    """An evaluator whose instances of each role run ``slowdown[role]`` times slower."""

    slowdown: dict[str, float] = field(default_factory=dict)

    def instance(self, role: str, cfg: PhaseConfig) -> InstanceSpec:
        spec = super().instance(role, cfg)
        factor = self.slowdown.get(role, 1.0)
        return spec if factor == 1.0 else replace(spec, latency=scaled(spec.latency, factor))


def role_ranks(p: Placement) -> dict[str, list[str]]:
    """The rank processes of each role (``LocalCluster`` starts prefill ranks, then decode, then
    colocated)."""
    out, k = {}, 0
    for role, cfg, num in (
        ("prefill", p.prefill, p.num_prefill),
        ("decode", p.decode, p.num_decode),
        ("colocated", p.colocated, p.num_colocated),
    ):
        if cfg is not None and num:
            size = cfg.tp * cfg.pp * num
            out[role] = [f"rank{i}" for i in range(k, k + size)]
            k += size
    return out


def engine_slowdown(p: Placement, cpu: dict[str, Any]) -> dict[str, float]:
    """Per role, 1 / the share of its core the engine thread got while runnable (mean over the
    role's ranks) in a measured run: the router, the bench client and the rank's own gRPC and
    transfer threads took the rest, so each step took that much longer than the profile's."""
    return {
        role: sum(1.0 / cpu[r]["engine_cpu_share"] for r in ranks) / len(ranks)
        for role, ranks in role_ranks(p).items()
    }
