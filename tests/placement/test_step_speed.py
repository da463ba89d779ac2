"""``SimSettings.step_speed`` / ``distserve plan --step-speed``: a role's steps scaled from the
profile's, for a serving stack measured to run slower than the isolated profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distserve.cli import main
from placement.evaluate import SLO, Evaluator, PhaseConfig, Placement, SimSettings
from placement.latency_model import LatencyModel
from placement.workload import from_lengths
from tests.placement.test_cli import A100, CAPACITY, plan_args
from tests.placement.test_search import toy_model


def test_a_scaled_model_takes_that_many_times_as_long() -> None:
    lat = LatencyModel((2.0, 0.1, 1e-4), (3.0, 0.01, 0.5), (4.0, 0.02, 0.6), 8, stage_overhead_ms=1)
    slow = lat.scaled(1.5)
    assert slow.prefill_ms([100, 50]) == pytest.approx(1.5 * lat.prefill_ms([100, 50]))
    assert slow.decode_ms(4, 400) == pytest.approx(1.5 * lat.decode_ms(4, 400))
    assert slow.decode_ms(16, 400) == pytest.approx(1.5 * lat.decode_ms(16, 400))
    assert slow.stage_overhead_ms == 1.5


def test_settings_check_roles_and_factors_and_read_json_lists() -> None:
    s = SimSettings(step_speed=json.loads('[["prefill", 1.25]]'))
    assert s.step_speed == (("prefill", 1.25),)
    assert (s.speed("prefill"), s.speed("decode")) == (1.25, 1.0)
    hash(s)  # still a frozen, hashable value
    with pytest.raises(ValueError, match="unknown role 'gpu'"):
        SimSettings(step_speed=(("gpu", 1.0),))
    with pytest.raises(ValueError, match="step speed of decode must be a positive number"):
        SimSettings(step_speed=(("decode", 0.0),))


def test_a_lone_request_waits_exactly_the_scaled_prefill() -> None:
    model = toy_model()  # prefill: 1 ms per prompt token
    workload = from_lengths("one", np.array([100]), np.array([2]), seed=0)
    one = PhaseConfig(1, 1)
    p = Placement(prefill=one, num_prefill=1, decode=one, num_decode=1, transfer_bytes_per_s=1e18)
    slo = SLO(ttft_s=1.0, tpot_s=1.0)
    ttft = {}
    for factor in (1.0, 3.0):
        settings = SimSettings(step_speed=(("prefill", factor),))
        ttft[factor] = Evaluator(model, workload, slo, settings).run(p, 1.0).ttft_s[0]
    assert ttft[1.0] == pytest.approx(0.100)
    assert ttft[3.0] == pytest.approx(0.300)


def test_slower_prefill_steps_lower_the_prefill_goodput() -> None:
    model = toy_model()
    n = 200
    workload = from_lengths("toy", np.full(n, 100), np.full(n, 10), seed=0, arrival_cv=0.01)
    slo = SLO(ttft_s=0.5, tpot_s=0.05)
    base = Evaluator(model, workload, slo)
    slow = Evaluator(model, workload, slo, SimSettings(step_speed=(("prefill", 2.0),)))
    rate = 8.0  # 0.8 of the toy prefill's 10 req/s: fine at the profile's speed, not at half
    assert base.prefill_attainment(PhaseConfig(1, 1), rate) >= 0.9
    assert slow.prefill_attainment(PhaseConfig(1, 1), rate) < 0.5


@pytest.mark.parametrize("value", ["prefill=abc", "gpu=1.2", "decode=0", "prefill"])
def test_the_plan_flag_refuses_bad_pairs(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--profile", "p.json", "--model-name", "m", "--ttft-slo", "1"]
    args += ["--tpot-slo", "1", "--gpus-per-node", "1", "--out", "c.yaml", "--step-speed", value]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "argument --step-speed: expected ROLE=FACTOR pairs" in capsys.readouterr().err


def test_plan_with_slower_prefill_predicts_less_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "profile.json").write_text(json.dumps(A100))
    (tmp_path / "distserve_a100_max_num_tokens.csv").write_text(CAPACITY)
    goodput = {}
    for speed in ("", "prefill=1.5"):
        out = tmp_path / f"plan{len(speed)}.yaml"
        extra = ("--quick", "--step-speed", speed) if speed else ("--quick",)
        assert main(plan_args(tmp_path / "profile.json", out, *extra)) == 0
        report = json.loads(out.with_suffix(".report.json").read_text())
        goodput[speed] = report["unit"]["goodput_per_s"]
        printed = capsys.readouterr().out
        assert ("step times scaled from the profile's (--step-speed): prefill ×1.5" in printed) == (
            bool(speed)
        )
    assert report["settings"]["step_speed"] == [["prefill", 1.5]]
    assert goodput["prefill=1.5"] < 0.9 * goodput[""]
