"""The simulator drives the very policy objects the live router does: same state, same decision."""

from __future__ import annotations

from typing import Any

import pytest

from distserve.bench.workloads import make_workload
from distserve.router.policies import make_policy
from placement.simulator import ClusterSpec, InstanceSpec, route_request, simulate

Trace = list[tuple[str, tuple[Any, ...], Any]]
DECISIONS = ("choose_prefill", "choose_decode")
OPTIONS: dict[str, dict[str, object]] = {
    "preble": {"warmup_requests_per_instance": 5, "window_s": 5.0}
}


@pytest.mark.parametrize("name", ["preble", "d2lpm", "cache_aware", "least_load"])
def test_simulator_decisions_equal_direct_calls_on_the_same_state(name: str) -> None:
    reqs = make_workload("tool_use", num_requests=200, rate_per_s=30.0, num_prefixes=6, seed=1)
    spec = ClusterSpec.disaggregated(
        3, 2, prefill=InstanceSpec("prefill", kv_capacity_tokens=20_000)
    )
    trace: Trace = []
    simulate(spec, reqs, make_policy(name, **OPTIONS.get(name, {})), trace=trace)
    assert sum(method in DECISIONS for method, _, _ in trace) == 2 * len(reqs)
    assert any(
        method == "on_blocks_evicted" for method, _, _ in trace
    )  # a full cache was exercised

    direct = make_policy(name, **OPTIONS.get(name, {}))
    for inst in spec.instances:  # what the simulator announced first
        direct.add_instance(inst.instance_id, inst.role, inst.kv_capacity_tokens // 32)
    for method, args, result in trace:
        assert getattr(direct, method)(*args) == result, (method, args[0])
    direct.check_consistency()


def test_one_decision_by_hand() -> None:
    reqs = make_workload(
        "shared_prefix", num_requests=3, num_groups=1, rate_per_s=1.0, block_size=32
    )
    trace: Trace = []
    result = simulate(ClusterSpec.colocated(2), reqs, make_policy("preble"), trace=trace)
    chosen = {r.request_id: r.prefill_instance for r in result.records}
    (first, *later) = [args for method, args, _ in trace if method == "choose_prefill"]
    assert first[0] == route_request(reqs[0])
    assert [load.instance_id for load in first[1]] == ["colocated-0", "colocated-1"]
    # the later requests follow the first one's prefix to the instance holding it
    assert chosen[reqs[1].request_id] == chosen[reqs[2].request_id] == chosen[reqs[0].request_id]
    assert len(later) == 2


def test_choose_decode_matches_the_reference_rule() -> None:
    """Most free tokens after what was sent (free blocks, capacity − outstanding), then fewest
    outstanding requests, ties to the earliest instance: the one-pass loop against ``min``."""
    import random

    from distserve.router.policies import InstanceLoad, RouteRequest

    rng = random.Random(0)
    policy = make_policy("least_load")
    for i in range(400):
        loads = [
            InstanceLoad(
                f"d{k}", "decode", free_kv_blocks=rng.choice([0, 5, 10]), total_kv_blocks=10
            )
            for k in range(rng.randint(1, 6))
        ]
        req = RouteRequest(f"r{i}", "c", rng.choice([16, 32]), (), 16, rng.choice([1, 16]), 0.0)
        policy.choose_prefill(req, [InstanceLoad("p0", "prefill")], 0.0)

        def key(inst: InstanceLoad) -> tuple[int, int]:
            free = min(
                inst.free_kv_blocks * 16,
                inst.total_kv_blocks * 16 - policy.outstanding_decode_tokens(inst.instance_id),
            )
            return (-free, policy.outstanding_decode_requests(inst.instance_id))

        expected = min(loads, key=key).instance_id
        assert policy.choose_decode(req, loads, 0.0) == expected
        if rng.random() < 0.5:
            policy.on_finished(req.request_id, 0.0)
