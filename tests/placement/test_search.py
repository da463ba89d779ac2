"""The placement search on hand-made latency models whose optimum is known.

The toy model: a prefill of a 100-token prompt takes 100 ms (capacity 10 req/s), a decode step
takes 10 ms + 1 ms per sequence; with 36 decode steps and a 50 ms TPOT SLO one decode instance
carries (1 − 10/50) / (36 × 1 ms) ≈ 22 req/s. Arrivals are nearly deterministic (CV 0.01), so
there is no queueing below capacity and the goodputs are the capacities:

    unit   1P+1D   2P+1D          3P+1D         (3P+2D needs 5 GPUs)
    req/s  10      20             22
    /GPU   5.0     6.67  ← best   5.5
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from placement.evaluate import SLO, Attainment, Evaluator, PhaseConfig, Placement
from placement.goodput import find_goodput
from placement.profile_format import ConfigProfile, ModelProfile
from placement.search import (
    DISTSERVE_RULES,
    OUR_RULES,
    ClusterShape,
    Links,
    phase_configs,
    search_colocated,
    search_units,
)
from placement.sizing import rank_layout
from placement.workload import from_lengths

RULES = replace(OUR_RULES, top_k=3)
FAST = Links(1e12, 1e12)


def toy_model(capacity: int | None = 10**6) -> ModelProfile:
    cfg = ConfigProfile(1, 1, (0.0, 1.0, 0.0), (10.0, 0.0, 1.0), (10.0, 0.0, 1.0), capacity or 0)
    return ModelProfile("toy", kv_bytes_per_token=1000, configs={(1, 1): cfg})


def toy_evaluator(model: ModelProfile | None = None) -> Evaluator:
    n = 300
    workload = from_lengths("toy", np.full(n, 100), np.full(n, 37), seed=0, arrival_cv=0.01)
    return Evaluator(model or toy_model(), workload, SLO(ttft_s=0.5, tpot_s=0.05))


def test_goodput_search_interpolates_the_crossing() -> None:
    result = find_goodput(lambda r: 1.0 - r / 100.0, target=0.9, hint_rate=3.0, rel_tol=0.01)
    assert result.rate_per_s == pytest.approx(10.0, rel=1e-6)
    assert not result.is_capped
    assert find_goodput(lambda r: 0.5, 0.9, 1.0).rate_per_s == 0.0
    assert find_goodput(lambda r: 1.0, 0.9, 1.0, max_doublings=3).is_capped


def test_phase_goodputs_are_the_toy_capacities() -> None:
    ev = toy_evaluator()
    res = search_units(ev, ClusterShape(4, 1), FAST, "fast", RULES)
    (g_p,) = res.prefill_goodput.values()
    (g_d,) = res.decode_goodput.values()
    assert g_p == pytest.approx(10.0, rel=0.03)
    assert g_d == pytest.approx(22.2, rel=0.03)


def test_a_two_to_one_ratio_beats_one_to_one() -> None:
    ours = search_units(toy_evaluator(), ClusterShape(4, 1), FAST, "fast", RULES)
    assert str(ours.best.placement) == "2×P(tp1) + 1×D(tp1)"
    assert ours.best.per_gpu == pytest.approx(20.0 / 3, rel=0.03)
    pairs = search_units(toy_evaluator(), ClusterShape(4, 1), FAST, "fast", DISTSERVE_RULES)
    assert str(pairs.best.placement) == "1×P(tp1) + 1×D(tp1)"
    assert pairs.best.per_gpu == pytest.approx(5.0, rel=0.03)


def test_transfer_time_changes_the_answer() -> None:
    """Two GPUs per node: 2P+1D spans two nodes, whose link (4 kB/s) needs 25 s per KV."""
    shape, slow_between_nodes = ClusterShape(2, 2), Links(1e12, 4e3)
    with_transfer = search_units(toy_evaluator(), shape, slow_between_nodes, "fast", RULES)
    assert str(with_transfer.best.placement) == "1×P(tp1) + 1×D(tp1)"
    assert with_transfer.best.placement.transfer_bytes_per_s == 1e12  # it stays in a node
    instant = search_units(
        toy_evaluator(), shape, slow_between_nodes, "fast", replace(RULES, transfer=False)
    )
    assert str(instant.best.placement) == "2×P(tp1) + 1×D(tp1)"


def test_slow_network_keeps_each_unit_inside_a_node() -> None:
    res = search_units(toy_evaluator(), ClusterShape(2, 2), Links(1e12, 4e3), "slow", RULES)
    assert all(v.placement.num_gpus <= 2 for v in res.verified)
    assert str(res.best.placement) == "1×P(tp1) + 1×D(tp1)"


def test_joint_attainment_is_never_above_either_phase() -> None:
    a = Attainment(joint=0.85, ttft=0.92, tpot=0.93)
    assert a.value("joint") == 0.85 and a.value("separate") == 0.92
    ev = toy_evaluator()
    p = Placement(PhaseConfig(1), 2, PhaseConfig(1), 1)
    at = ev.attainment(p, 21.0)
    assert at.joint <= min(at.ttft, at.tpot)


def test_colocated_search_finds_the_single_instance() -> None:
    ev = toy_evaluator()
    found = search_colocated(ev, ClusterShape(4, 1), RULES, bounds={1: 10.0}, budgets=(512,))
    assert found is not None
    unit, budget = found
    assert str(unit.placement) == "1×colocated(tp1)" and budget == 512
    assert 0 < unit.rate_per_s <= 10.0


def test_a_model_that_fits_no_configuration_is_a_clear_error() -> None:
    ev = toy_evaluator(toy_model(capacity=None))
    with pytest.raises(ValueError, match="toy fits no configuration"):
        phase_configs(ev, ClusterShape(8, 1), "fast", max_pp=1)
    big_tp = ModelProfile("big", 1000, {(8, 1): replace(toy_model().configs[1, 1], tp=8)})
    with pytest.raises(ValueError, match="big fits no configuration on 1 node"):
        phase_configs(toy_evaluator(big_tp), ClusterShape(4, 1), "fast", max_pp=1)


@pytest.mark.parametrize(
    ("ttft", "tpot", "attainment", "message"),
    [
        (0.0, 0.1, 0.9, "ttft SLO must be > 0"),
        (0.2, -1.0, 0.9, "tpot SLO must be > 0"),
        (0.2, 0.1, 1.5, "attainment target must be in"),
    ],
)
def test_invalid_slos_are_clear_errors(
    ttft: float, tpot: float, attainment: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SLO(ttft, tpot, attainment)


def test_rank_layout_names_instances_that_straddle_nodes() -> None:
    p = Placement(PhaseConfig(2), 3, PhaseConfig(4), 1)
    layout = rank_layout(p, gpus_per_node=8)
    assert layout.nodes[0][-1].startswith("decode-0 (tp4, ranks 6-9)")
    assert layout.straddling == ("decode-0 (tp4, ranks 6-9)",)
    assert rank_layout(Placement(PhaseConfig(2), 2, PhaseConfig(4), 1), 8).straddling == ()


def test_a_pipeline_search_still_verifies_units_the_engine_can_run() -> None:
    res = search_units(toy_evaluator(), ClusterShape(4, 1), FAST, "fast", RULES, max_pp=2)
    pps = {(v.placement.prefill.pp, v.placement.decode.pp) for v in res.verified}  # type: ignore[union-attr]
    assert (1, 1) in pps and any(pp != (1, 1) for pp in pps)
