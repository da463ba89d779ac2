"""The simulator side of ``placement_validate.py``: the bench's own requests, and calibration.

``bench_workload`` rebuilds exactly what ``distserve bench --dataset random`` sent at one rate
(its lengths: ``workloads.random_lengths`` with the bench's seed; its arrival times: Gamma/
Poisson with seed + rate index). ``calibrated`` adds the serving stack's per-step overhead to
the profile's constant terms: the live median TTFT and TPOT minus the simulated ones at a rate
so low that nothing queues (router and gRPC hops, token streaming, the engine thread sharing its
core with the instance's gRPC server — none of which ``engine.step()`` timings contain).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from distserve.bench import workloads
from distserve.bench.arrivals import gamma_arrivals
from distserve.bench.workloads import WorkloadRequest
from placement.evaluate import SLO, Evaluator, Placement, SimSettings
from placement.profile_format import ModelProfile
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
