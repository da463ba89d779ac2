"""``make_plan`` end to end on the toy model, and what it writes: a YAML the launcher loads, a
report, a plot; sizing for a rate and for a GPU budget; workload specs and their errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from distserve.launch.cluster_config import load_cluster_config
from placement.evaluate import SLO, PhaseConfig, Placement
from placement.output import cluster_yaml, plot_attainment, report_dict, write_report, write_yaml
from placement.planner import Plan, make_plan
from placement.profile_format import ConfigProfile, HardwareProfile, ModelProfile
from placement.search import OUR_RULES, ClusterShape
from placement.workload import from_lengths, parse_workload

RULES = replace(OUR_RULES, top_k=3)


def toy_profile(device: str = "cpu") -> HardwareProfile:
    cfg = ConfigProfile(1, 1, (0.0, 1.0, 0.0), (10.0, 0.0, 1.0), (10.0, 0.0, 1.0), 10**6)
    model = ModelProfile("toy", 1000, {(1, 1): cfg}, path="/models/toy", kv_cache_memory_gib=0.5)
    return HardwareProfile({"toy": model}, 1e12, 1e12, device=device)


def toy_plan(rate: float | None = None, gpus: int | None = None, nodes: int = 1) -> Plan:
    n = 300
    workload = from_lengths("toy", np.full(n, 100), np.full(n, 37), seed=0, arrival_cv=0.01)
    return make_plan(
        toy_profile(), "toy", workload, SLO(0.5, 0.05), ClusterShape(4, nodes),
        rate=rate, gpus=gpus, rules=RULES,
    )  # fmt: skip


@pytest.fixture(scope="module")
def plan() -> Plan:
    return toy_plan()


def test_four_devices_get_the_most_goodput_not_the_best_unit_copied(plan: Plan) -> None:
    """Per GPU 2P+1D is best (6.7 req/s); on four devices 3P+1D serves 22 req/s, 2P+2D 20."""
    assert str(plan.search.best.placement) == "2×P(tp1) + 1×D(tp1)"
    assert str(plan.chosen.placement) == "3×P(tp1) + 1×D(tp1)"
    assert plan.chosen.predicted_rate_per_s == pytest.approx(22.2, rel=0.05)
    assert plan.colocated is not None and plan.colocated.placement.num_colocated == 4
    assert plan.distribution["attainment"] >= 0.85


def test_sizing_for_a_rate_uses_the_fewest_devices() -> None:
    p = toy_plan(rate=25.0, nodes=2)
    assert p.chosen.placement.num_gpus == 5 and p.chosen.predicted_rate_per_s >= 25.0
    with pytest.raises(ValueError, match="needs more than the 8 GPUs"):
        toy_plan(rate=200.0, nodes=2)


def test_the_yaml_loads_with_the_cluster_config_validator(plan: Plan, tmp_path: Path) -> None:
    data = cluster_yaml(plan, plan.chosen.placement, "/models/toy", "cpu", 0.5)
    write_yaml(data, tmp_path / "cluster.yaml", "a header\nof two lines")
    text = (tmp_path / "cluster.yaml").read_text()
    assert text.startswith("# a header\n# of two lines\n")
    config = load_cluster_config(tmp_path / "cluster.yaml")
    assert (config.prefill.instances, config.decode.instances, config.world_size) == (3, 1, 4)
    assert config.prefill.cpu_cores == [[0], [1], [2]] and config.decode.cpu_cores == [[3]]
    assert config.prefill.num_threads == 1 and config.kv_cache.cpu_memory_gib == 0.5
    assert config.slo.ttft_s == 0.5 and config.router.policy == "least_load"
    coloc = cluster_yaml(plan, plan.colocated.placement, "/models/toy", "cpu", 0.5)
    write_yaml(coloc, tmp_path / "coloc.yaml", "")
    assert load_cluster_config(tmp_path / "coloc.yaml").colocated.instances == 4
    gpu = cluster_yaml(plan, plan.chosen.placement, "/models/toy", "cuda", None)
    assert "cpu_cores" not in gpu["prefill"] and gpu["transfer"]["backend"] == "nccl"


def test_pipeline_parallel_placements_are_not_written(plan: Plan) -> None:
    pp2 = Placement(PhaseConfig(1, 2), 1, PhaseConfig(1), 1)
    with pytest.raises(ValueError, match="needs pipeline parallelism"):
        cluster_yaml(plan, pp2, "/m", "cuda", None)


def test_report_and_plot(plan: Plan, tmp_path: Path) -> None:
    write_report(plan, tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["chosen"]["placement"] == "3×P(tp1) + 1×D(tp1)"
    assert report["candidates"][0]["placement"] == "2×P(tp1) + 1×D(tp1)"
    assert report["num_simulations"] == plan.num_simulations > 0
    assert report_dict(plan)["unit"]["curve"]
    plot_attainment(plan, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_workload_specs() -> None:
    fixed = parse_workload("synthetic:in=512,out=64", num_requests=10)
    assert set(fixed.input_lens) == {512} and set(fixed.output_lens) == {64}
    spread = parse_workload("synthetic:in=uniform:10:20,out=lognormal:30:0.5", num_requests=50)
    assert spread.input_lens.min() >= 10 and spread.input_lens.max() <= 20
    like = parse_workload("sharegpt-like", num_requests=400)
    assert 700 < like.input_lens.mean() < 950 and (like.input_lens + like.output_lens).max() <= 2048
    clipped = parse_workload("synthetic:in=3000,out=10", num_requests=5, max_model_len=2048)
    assert clipped.num_clipped == 5 and set(clipped.input_lens) == {2047}
    times = [r.arrival_s for r in fixed.at_rate(2.0)]
    assert times == pytest.approx([r.arrival_s / 2 for r in fixed.base])


def test_workload_files(tmp_path: Path) -> None:
    conv = [{"conversations": [{"value": "x" * 400}, {"value": "y" * 80}]}] * 3
    (tmp_path / "sg.json").write_text(json.dumps(conv))
    sg = parse_workload(str(tmp_path / "sg.json"), num_requests=3)
    assert list(sg.input_lens) == [100] * 3 and list(sg.output_lens) == [20] * 3
    rows = [
        {"timestamp": t, "input_length": 600, "output_length": 5, "hash_ids": [7, t]}
        for t in (0, 1000)
    ]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    mc = parse_workload(f"mooncake:{tmp_path / 'mc.jsonl'}", num_requests=2)
    assert mc.has_shared_prefixes and [r.arrival_s for r in mc.base] == [0.0, 1.0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("chatbot", "unknown workload 'chatbot'"),
        ("synthetic:in=512", "expected synthetic:in=D,out=D"),
        ("synthetic:in=zipf:2,out=5", "expected N, uniform:LO:HI or lognormal"),
        ("sharegpt:/no/such/file.json", "does not exist"),
    ],
)
def test_bad_workloads_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_workload(spec, num_requests=5)
