"""The simulator side of ``placement_validate.py``: the bench's own requests, and the step
speed of a live run.

``bench_workload`` rebuilds exactly what ``distserve bench --dataset random`` sent at one rate
(its lengths: ``workloads.random_lengths`` with the bench's seed; its arrival times: Gamma/
Poisson gaps drawn with that same seed at every rate, scaled by 1 / rate. ``distserve bench``
has done so since before this script existed, and the script simulated seed + rate index until
2026-11-21 19:55: every earlier comparison simulated other arrival times than the bench sent at
its second and later rates). ``step_speed`` takes a process's steps from a run's
``DISTSERVE_TIMELINE`` (``distserve.timeline.read``): how much longer they took than the
profile gives for the same batches.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from distserve.bench import workloads
from distserve.bench.arrivals import gamma_arrivals
from distserve.bench.workloads import WorkloadRequest
from distserve.timeline import ProcessTimeline
from placement.evaluate import SLO, Evaluator, Placement, SimSettings
from placement.latency_model import LatencyModel
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
    slowdown: dict[str, float] | None = None,
) -> dict[str, float]:
    """Attainment and medians of ``p`` at ``rate``; ``slowdown``: per role, steps that many
    times the profile's (``SimSettings.step_speed``)."""
    if slowdown:
        settings = replace(settings, step_speed=tuple(slowdown.items()))
    ev = Evaluator(model, workload, slo, settings)
    result = ev.run(p, rate)
    return {
        "attainment": ev.measure(result).joint,
        "p50_ttft_s": float(np.median(result.ttft_s)),
        "p50_tpot_s": float(np.median(result.tpot_s)),
    }


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


# ---- the device speed of a live run ------------------------------------------------------------
def predicted_step_ms(lat: LatencyModel, role: str, new: list[int], computed: list[int]) -> float:
    """The profile's time for one live step (as ``SimInstance._time`` composes it): the prompt
    chunks' work, plus a decode step's time when the step decodes, else the prefill constant.
    ``new`` and ``computed``: per request, tokens computed by the step and already in cache."""
    work, decodes, ctx = 0.0, 0, 0
    for n, k in zip(new, computed, strict=True):
        if n == 1 and role != "prefill":
            decodes += 1
            ctx += k + 1
        else:
            work += lat.extend_work_ms(n, k)
    return work + (lat.decode_ms(decodes, ctx) if decodes else lat.prefill[0])


def rate_windows(
    client: ProcessTimeline, warmup: int, per_rate: int, num_rates: int
) -> list[tuple[float, float]]:
    """(start, end) of each rate's run in a bench process's timeline: its requests in send
    order, the warm-up first, then ``per_rate`` per rate (a rate starts when the previous one
    has finished)."""
    sends = sorted(t for t, _, event in client.events if event == "client.send")
    starts = [sends[warmup + i * per_rate] for i in range(num_rates)]
    return list(zip(starts, [*starts[1:], float("inf")], strict=True))


def step_speed(
    proc: ProcessTimeline, lat: LatencyModel, role: str, window: tuple[float, float]
) -> float | None:
    """How much longer the steps one process ran in ``window`` took than the profile says:
    their summed measured time over their summed predicted time (None: no step)."""
    steps = [s for s in proc.steps if window[0] <= s.start_s < window[1]]
    predicted = sum(predicted_step_ms(lat, role, s.new_tokens, s.computed) for s in steps)
    measured = sum(1e3 * (s.end_s - s.start_s) for s in steps)
    return measured / predicted if predicted else None
