"""Sending a benchmark's prompts at one arrival rate and collecting their records.

Each prompt is sent at its arrival time (from the start of the run), by its own task, at most
``max_concurrency`` at once when set (a prompt whose time has come waits for a free slot; its
TTFT is timed from when it is actually sent, as vLLM's and SGLang's clients do). The run lasts
from the first send to the last answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence

from tqdm import tqdm

from distserve.bench.arrivals import gamma_arrivals, rescale_to_rate
from distserve.bench.backends import Backend
from distserve.bench.prompts import BenchPrompt
from distserve.bench.records import RequestRecord
from distserve.bench.workloads import WorkloadRequest


def arrival_times(
    prompts: Sequence[BenchPrompt], rate_per_s: float, burstiness: float, seed: int, is_trace: bool
) -> list[float]:
    """Send times (s from the start) at ``rate_per_s``: Gamma gaps with shape ``burstiness``
    (1 = Poisson), or a trace's own timestamps rescaled to the rate; ``inf`` sends all at once."""
    if math.isinf(rate_per_s):
        return [0.0] * len(prompts)
    if is_trace:
        stand_ins = [_timestamp_only(p) for p in prompts]
        return [r.arrival_s for r in rescale_to_rate(stand_ins, rate_per_s)]
    cv = 1.0 / math.sqrt(burstiness)  # Gamma with shape k has CV 1/√k
    return gamma_arrivals(len(prompts), rate_per_s, cv=cv, seed=seed)


def _timestamp_only(p: BenchPrompt) -> WorkloadRequest:
    return WorkloadRequest(p.request_id, p.trace_arrival_s, p.client_id, 1, 1, (0,), 1)


async def run_rate(
    backend: Backend,
    prompts: Sequence[BenchPrompt],
    arrivals_s: Sequence[float],
    *,
    max_concurrency: int | None = None,
    label: str = "",
    show_progress: bool = True,
) -> tuple[list[RequestRecord], float]:
    """Send every prompt at its time; returns the records (in prompt order) and the duration."""
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(prompts), desc=label, disable=not show_progress, leave=False)
    start = time.perf_counter()

    async def one(prompt: BenchPrompt, at_s: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + at_s - time.perf_counter()))
        async with slots if slots is not None else contextlib.nullcontext():
            rec = await backend.send(prompt)
        bar.update(1)
        return rec

    try:
        records = await asyncio.gather(*(one(p, t) for p, t in zip(prompts, arrivals_s)))
    finally:
        bar.close()
    first_send = min((r.send_s for r in records), default=start)
    last_end = max((r.send_s + (r.e2e_s or 0.0) for r in records), default=start)
    return list(records), last_end - first_send
