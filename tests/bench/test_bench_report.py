"""Bench statistics: TPOT/ITL from event times, summaries, SLO attainment, goodput crossing."""

from __future__ import annotations

import itertools
import math

import pytest

from distserve.bench.load import arrival_times
from distserve.bench.prompts import BenchPrompt
from distserve.bench.records import RequestRecord
from distserve.bench.report import find_goodput, summarize, to_json


def record(ttft_s: float, gaps_s: list[float], *, rid: str = "r", ok: bool = True) -> RequestRecord:
    rec = RequestRecord(rid, expected_output_len=len(gaps_s) + 1, input_len=10, send_s=100.0)
    times = [100.0 + ttft_s]
    for gap in gaps_s:
        times.append(times[-1] + gap)
    if ok:
        rec.finish(times, times[-1] + 0.001, len(times))
    else:
        rec.fail("HTTP 503: busy", 101.0)
    return rec


def test_record_timings_follow_the_definitions():
    rec = record(0.5, [0.1, 0.3])
    assert rec.ttft_s == pytest.approx(0.5)
    assert rec.itl_s == pytest.approx([0.1, 0.3])
    assert rec.tpot_s == pytest.approx(0.2)  # (last - first) / (3 - 1)
    assert rec.output_len == 3 and rec.is_success
    one = record(0.2, [])
    assert one.tpot_s is None and one.itl_s == []
    several_per_event = RequestRecord("x", 4, 1, send_s=0.0)
    several_per_event.finish([1.0, 2.0], 2.5, num_output_tokens=4)  # 2 events, 4 tokens
    assert several_per_event.tpot_s == pytest.approx(1.0 / 3)


def test_summary_counts_errors_and_attainment_counts_them_as_misses():
    recs = [
        record(0.1, [0.01, 0.01]),  # meets both
        record(0.1, [0.5, 0.5]),  # TPOT 0.5 > 0.2
        record(2.0, [0.01]),  # TTFT 2.0 > 1.0
        record(0.3, []),  # one token: no TPOT, meets
        record(0.1, [0.01], ok=False),
    ]
    res = summarize(4.0, recs, duration_s=2.0, ttft_slo_s=1.0, tpot_slo_s=0.2)
    assert (res.num_requests, res.num_completed, res.num_errors) == (5, 4, 1)
    assert res.errors == {"HTTP 503: busy": 1}
    assert res.slo_attainment == pytest.approx(2 / 5)
    assert res.total_output_tokens == 3 + 3 + 2 + 1
    assert res.output_throughput == pytest.approx(9 / 2.0)
    assert res.request_throughput == pytest.approx(2.0)
    for s in (res.ttft_s, res.tpot_s, res.itl_s, res.e2e_s):
        assert s.median <= s.p90 <= s.p99
    assert res.ttft_s.mean == pytest.approx((0.1 + 0.1 + 2.0 + 0.3) / 4)
    assert summarize(1.0, recs, 1.0, None, None).slo_attainment is None


def test_goodput_interpolates_where_attainment_crosses_the_target():
    points = [(4.0, 0.5), (1.0, 1.0), (3.0, 0.8), (2.0, 0.95)]  # any order
    g = find_goodput(points, target=0.9, num_devices=2)
    assert g.rate_per_s == pytest.approx(2.0 + (0.95 - 0.9) / (0.95 - 0.8))
    assert g.per_device == pytest.approx(g.rate_per_s / 2)
    assert not g.is_lower_bound


def test_goodput_edges():
    exact = find_goodput([(1.0, 1.0), (2.0, 0.9), (3.0, 0.6)], 0.9)
    assert exact.rate_per_s == pytest.approx(2.0)
    # a noisy recovery after the first miss does not count
    noisy = find_goodput([(1.0, 1.0), (2.0, 0.5), (3.0, 0.95)], 0.9)
    assert noisy.rate_per_s == pytest.approx(1.2)
    every = find_goodput([(1.0, 1.0), (2.0, 0.92)], 0.9)
    assert every.rate_per_s == 2.0 and every.is_lower_bound
    none = find_goodput([(1.0, 0.5), (2.0, 0.2)], 0.9)
    assert none.rate_per_s is None and "lowest rate" in none.note
    to_inf = find_goodput([(1.0, 1.0), (math.inf, 0.1)], 0.9)
    assert to_inf.rate_per_s == 1.0
    assert find_goodput([], 0.9).rate_per_s is None


def test_json_has_no_infinities():
    res = summarize(math.inf, [record(0.1, [0.1])], 1.0, 1.0, 1.0)
    report = to_json({"rate": math.inf}, [res], find_goodput([], 0.9))
    assert report["results"][0]["rate_per_s"] == "inf" and report["config"]["rate"] == "inf"


def prompts(n: int) -> list[BenchPrompt]:
    return [BenchPrompt(f"p{i}", "c0", [1], 1, 1, trace_arrival_s=2.0 * i) for i in range(n)]


def test_arrival_times():
    assert arrival_times(prompts(3), math.inf, 1.0, 0, is_trace=False) == [0.0, 0.0, 0.0]
    times = arrival_times(prompts(2000), 50.0, 1.0, 0, is_trace=False)
    assert times == sorted(times) and times[0] == 0.0
    assert times[-1] / 1999 == pytest.approx(1 / 50.0, rel=0.1)
    bursty = arrival_times(prompts(2000), 50.0, 0.25, 0, is_trace=False)
    gaps = [b - a for a, b in itertools.pairwise(bursty[1:])]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert cv == pytest.approx(2.0, rel=0.2)  # shape 1/4 -> CV 2
    trace = arrival_times(prompts(5), 4.0, 1.0, 0, is_trace=True)
    assert trace == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # 2 s gaps squeezed to 4/s
