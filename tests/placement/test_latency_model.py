"""The DistServe-style latency model: formulas, pipeline stages, the fit, the A100 profile."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from placement.latency_model import (
    DEFAULT_PROFILE_PATH,
    LatencyModel,
    fit_decode,
    fit_prefill,
    kv_capacity_tokens,
    kv_transfer_s,
    opt13b_a100,
)

MODEL = LatencyModel(
    prefill=(10.0, 0.1, 1e-5), decode_small=(20.0, 1e-3, 0.05), decode_large=(8.0, 1e-3, 0.15)
)


def test_prefill_and_decode_formulas() -> None:
    assert MODEL.prefill_ms([100, 300]) == pytest.approx(10 + 0.1 * 400 + 1e-5 * (100**2 + 300**2))
    assert MODEL.decode_ms(95, 10_000) == pytest.approx(20 + 10 + 0.05 * 95)  # small set up to 95
    assert MODEL.decode_ms(96, 10_000) == pytest.approx(8 + 10 + 0.15 * 96)
    assert MODEL.decode_ms(0, 0) == 0.0


def test_chunks_and_cached_prefixes_telescope_to_the_whole_prompt() -> None:
    whole = MODEL.extend_work_ms(1000, 0)
    chunks = (
        MODEL.extend_work_ms(300, 0)
        + MODEL.extend_work_ms(300, 300)
        + MODEL.extend_work_ms(400, 600)
    )
    assert chunks == pytest.approx(whole)
    assert whole + MODEL.prefill[0] == pytest.approx(MODEL.prefill_ms([1000]))


def test_pipeline_divides_stage_time_and_adds_overhead() -> None:
    pp2 = LatencyModel(
        MODEL.prefill, MODEL.decode_small, MODEL.decode_large, pp=2, stage_overhead_ms=1.0
    )
    assert pp2.prefill_stage_ms(100.0) == pytest.approx(51.0)
    assert pp2.prefill_batch_latency_ms(100.0) == pytest.approx(102.0)
    assert pp2.decode_step_latency_ms(40, 4000) == pytest.approx(MODEL.decode_ms(20, 2000) + 2.0)


def test_fit_recovers_known_coefficients_from_synthetic_timings() -> None:
    rng = random.Random(0)
    prefill_samples = []
    for _ in range(60):
        lens = [rng.randrange(16, 2048) for _ in range(rng.randrange(1, 5))]
        prefill_samples.append((lens, MODEL.prefill_ms(lens)))
    fit = fit_prefill(prefill_samples)
    assert fit.coeffs == pytest.approx(MODEL.prefill, rel=1e-6)
    assert fit.max_rel_error < 1e-9
    decode_samples = []
    for _ in range(200):
        bs = rng.randrange(1, 200)
        total = bs * rng.randrange(100, 2000)
        decode_samples.append((bs, total, MODEL.decode_ms(bs, total)))
    small, large = fit_decode(decode_samples)
    assert small.coeffs == pytest.approx(MODEL.decode_small, rel=1e-6)
    assert large is not None and large.coeffs == pytest.approx(MODEL.decode_large, rel=1e-6)


def test_fit_reports_relative_error_on_noisy_timings() -> None:
    rng = random.Random(1)
    samples = [([n], MODEL.prefill_ms([n]) * rng.uniform(0.95, 1.05)) for n in range(64, 4096, 64)]
    fit = fit_prefill(samples)
    assert 0.0 < fit.mean_rel_error < 0.05 and fit.max_rel_error < 0.1
    assert fit.num_samples == len(samples)
    with pytest.raises(ValueError, match="at least 3 samples"):
        fit_prefill(samples[:2])


def test_kv_transfer_time() -> None:
    assert kv_transfer_s(1000, 800_000, 100e9) == pytest.approx(0.008)
    with pytest.raises(ValueError):
        kv_transfer_s(1, 1, 0)


@pytest.mark.skipif(not Path(DEFAULT_PROFILE_PATH).exists(), reason="needs ../shared/data")
def test_distserve_profile_loads_and_matches_the_embedded_default() -> None:
    assert LatencyModel.from_profile("facebook/opt-13b", tp=1) == opt13b_a100()
    tp2 = LatencyModel.from_profile("facebook/opt-13b", tp=2, pp=2)
    assert tp2.tp == 2 and tp2.pp == 2 and tp2.prefill[1] < opt13b_a100().prefill[1]
    assert kv_capacity_tokens("facebook/opt-13b", 1, 1) == 66144
    with pytest.raises(ValueError, match="TP=3"):
        LatencyModel.from_profile("facebook/opt-13b", tp=3)


def test_pipeline_without_micro_batching_is_one_whole_pass() -> None:
    from placement.latency_model import LatencyModel

    coeffs = (10.0, 0.01, 0.0)
    piped = LatencyModel(coeffs, (5.0, 0.001, 0.1), (5.0, 0.001, 0.1), pp=2, stage_overhead_ms=1.0)
    whole = LatencyModel(
        coeffs,
        (5.0, 0.001, 0.1),
        (5.0, 0.001, 0.1),
        pp=2,
        stage_overhead_ms=1.0,
        micro_batched=False,
    )
    work = 100.0
    # micro-batched: a stage is busy for half the work, the batch takes both stages
    assert piped.prefill_stage_ms(work) == 51.0 and piped.prefill_batch_latency_ms(work) == 102.0
    # stage after stage: the instance is busy for the whole pass, nothing overlaps
    assert whole.prefill_stage_ms(work) == whole.prefill_batch_latency_ms(work) == 102.0
    assert whole.decode_step_latency_ms(8, 800) == whole.decode_ms(8, 800) + 2.0
    assert piped.decode_step_latency_ms(8, 800) == piped.decode_ms(4, 400) + 2.0
