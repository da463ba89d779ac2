"""Statistics of a benchmark: per-rate latency percentiles, throughput, SLO attainment, goodput.

Definitions follow ALGORITHMS.md §1. Attainment counts a request as meeting the SLOs when it
succeeded, its TTFT ≤ the TTFT SLO and its TPOT ≤ the TPOT SLO (a request with one output token
has no TPOT and meets that half); failed requests count as misses, never dropped. Goodput is the
highest rate whose attainment is ≥ the target, found on a rate sweep:

    attainment
      1.0 ┤ ●───●
          │       ╲
   target ┤┈┈┈┈┈┈┈┈✕┈┈┈┈     ✕ = interpolated crossing between the last rate that meets the
          │         ╲           target and the next one that does not
          └──┴───┴───┴──── rate

Only the rates up to the first miss count (a noisy later recovery does not raise goodput).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from distserve.bench.records import RequestRecord


@dataclass(frozen=True)
class Summary:
    mean: float | None
    median: float | None
    p90: float | None
    p99: float | None

    @staticmethod
    def of(values: Sequence[float]) -> Summary:
        if not values:
            return Summary(None, None, None, None)
        arr = np.asarray(values, dtype=float)
        p50, p90, p99 = np.percentile(arr, [50, 90, 99]).tolist()
        return Summary(float(arr.mean()), p50, p90, p99)


@dataclass
class RateResult:
    rate_per_s: float  # requested arrival rate (inf: all at once)
    num_requests: int
    num_completed: int
    num_errors: int
    errors: dict[str, int]  # error message -> count
    duration_s: float  # first send to last answer
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    input_throughput: float  # prompt tokens / s (completed requests)
    total_input_tokens: int
    total_output_tokens: int
    ttft_s: Summary
    tpot_s: Summary
    itl_s: Summary
    e2e_s: Summary
    slo_attainment: float | None  # None without SLOs
    requests: list[dict[str, Any]] = field(default_factory=list)  # with --save-requests
    client_cpu_s: float | None = None  # CPU this bench process used for the rate (all threads)


def meets_slo(rec: RequestRecord, ttft_slo_s: float | None, tpot_slo_s: float | None) -> bool:
    if not rec.is_success:
        return False
    if ttft_slo_s is not None and (rec.ttft_s is None or rec.ttft_s > ttft_slo_s):
        return False
    return tpot_slo_s is None or rec.tpot_s is None or rec.tpot_s <= tpot_slo_s


def summarize(
    rate_per_s: float,
    records: Sequence[RequestRecord],
    duration_s: float,
    ttft_slo_s: float | None,
    tpot_slo_s: float | None,
) -> RateResult:
    ok = [r for r in records if r.is_success]
    total_out = sum(r.output_len for r in ok)
    total_in = sum(r.input_len for r in ok)
    span = max(duration_s, 1e-9)
    has_slo = ttft_slo_s is not None or tpot_slo_s is not None
    attained = sum(meets_slo(r, ttft_slo_s, tpot_slo_s) for r in records)
    return RateResult(
        rate_per_s=rate_per_s,
        num_requests=len(records),
        num_completed=len(ok),
        num_errors=len(records) - len(ok),
        errors=dict(Counter(r.error for r in records if not r.is_success)),
        duration_s=duration_s,
        request_throughput=len(ok) / span,
        output_throughput=total_out / span,
        input_throughput=total_in / span,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        ttft_s=Summary.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=Summary.of([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl_s=Summary.of([gap for r in ok for gap in r.itl_s]),
        e2e_s=Summary.of([r.e2e_s for r in ok if r.e2e_s is not None]),
        slo_attainment=attained / len(records) if has_slo and records else None,
    )


@dataclass(frozen=True)
class Goodput:
    rate_per_s: float | None  # None: even the lowest rate missed the target (or no SLOs)
    per_device: float | None
    is_lower_bound: bool  # every rate met the target: the true goodput is at least this
    note: str


def find_goodput(
    points: Sequence[tuple[float, float]], target: float, num_devices: int = 1
) -> Goodput:
    """Goodput from ``(rate, attainment)`` points of a sweep (any order)."""
    ordered = sorted(points)
    if not ordered:
        return Goodput(None, None, False, "no rates with SLO attainment")
    if ordered[0][1] < target:
        note = f"attainment {ordered[0][1]:.3f} < {target} already at the lowest rate"
        return Goodput(None, None, False, note + f" {ordered[0][0]:g}/s: sweep lower rates")
    for (r_ok, a_ok), (r_bad, a_bad) in itertools.pairwise(ordered):
        if a_bad < target:
            if math.isinf(r_bad):
                rate = r_ok
            else:
                rate = r_ok + (a_ok - target) / (a_ok - a_bad) * (r_bad - r_ok)
            note = f"interpolated between {r_ok:g}/s ({a_ok:.3f}) and {r_bad:g}/s ({a_bad:.3f})"
            return Goodput(rate, rate / num_devices, False, note)
    top = ordered[-1][0]
    note = f"every rate met the target; goodput is at least {top:g}/s: sweep higher rates"
    return Goodput(top, top / num_devices, True, note)


def to_json(
    config: dict[str, Any], results: Sequence[RateResult], goodput: Goodput
) -> dict[str, Any]:
    """The report as plain JSON types (an infinite rate is written as the string "inf")."""
    report = {
        "config": config,
        "results": [asdict(r) for r in results],
        "goodput": asdict(goodput),
    }
    return _finite(report)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def format_table(results: Sequence[RateResult]) -> str:
    """A fixed-width table of the per-rate results, times in milliseconds."""
    head = (
        f"{'rate/s':>7} {'done':>5} {'err':>4} {'req/s':>6} {'tok/s':>8} "
        f"{'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>8} {'ITL p50':>8} {'E2E p50':>8} "
        f"{'SLO att.':>8}"
    )
    rows = [head]
    for r in results:
        att = f"{r.slo_attainment:.3f}" if r.slo_attainment is not None else "-"
        rows.append(
            f"{r.rate_per_s:>7g} {r.num_completed:>5} {r.num_errors:>4} "
            f"{r.request_throughput:>6.2f} {r.output_throughput:>8.1f} "
            f"{_ms(r.ttft_s.median):>9} {_ms(r.ttft_s.p99):>8} {_ms(r.tpot_s.median):>9} "
            f"{_ms(r.tpot_s.p99):>8} {_ms(r.itl_s.median):>8} {_ms(r.e2e_s.median):>8} {att:>8}"
        )
    return "\n".join(rows)


def _ms(value_s: float | None) -> str:
    return "-" if value_s is None else f"{value_s * 1000:.1f}"
