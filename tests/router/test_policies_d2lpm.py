"""Exact decisions and deficit accounting of the D²LPM-like policy (our design, see d2lpm.py)."""

from __future__ import annotations

from distserve.router.policies import InstanceLoad, RouteRequest, make_policy
from distserve.router.policies.d2lpm import D2LPMPolicy

BS = 16


def req(rid: str, hashes: list[int], client: str, num_tokens: int | None = None) -> RouteRequest:
    n = num_tokens if num_tokens is not None else len(hashes) * BS
    return RouteRequest(rid, client, n, tuple(hashes), BS, 1, 0.0)


A, B, C = (InstanceLoad(instance_id=i, role="prefill") for i in "abc")


def d2lpm(**options: object) -> D2LPMPolicy:
    defaults: dict[str, object] = {"quantum_tokens": 100, "w_out": 0.0, "overload_abs_tokens": 0}
    policy = make_policy("d2lpm", **{**defaults, **options})
    assert isinstance(policy, D2LPMPolicy)
    return policy


def test_router_deficit_refills_when_every_active_client_is_spent() -> None:
    policy = d2lpm()
    policy.choose_prefill(req("c1", [1, 2, 3, 4], "c"), [A], 0.0)  # 100 - 64
    assert policy.router_deficit["c"] == 36
    policy.choose_prefill(req("d1", [5, 6], "d"), [A], 0.0)  # d: 100 - 32
    policy.choose_prefill(req("c2", [7, 8, 9, 10], "c"), [A], 0.0)  # c: -28, d still positive
    assert policy.router_deficit == {"c": -28, "d": 68}
    policy.choose_prefill(req("d2", [11, 12, 13, 14, 15], "d"), [A], 0.0)  # d: -12: both spent
    assert policy.router_deficit == {"c": 72, "d": 88}
    policy.check_consistency()


def test_a_client_alone_on_an_instance_is_never_held_back_by_its_own_deficit() -> None:
    policy = d2lpm(overload_ratio=100.0)
    policy.on_blocks_stored("a", [1], 0.0)
    chosen = [
        policy.choose_prefill(req(f"x{i}", [1, 10 + i, 20 + i, 30 + i], "x"), [A, B], 0.0)
        for i in range(4)
    ]
    assert chosen == ["a"] * 4  # local deficit 100 → 52 → 4 → -44 → refilled to 56 at x3
    assert policy.local_deficit[("x", "a")] == 56 - 48
    policy.check_consistency()


def test_clients_sharing_a_hot_instance_share_its_locality() -> None:
    policy = d2lpm(overload_ratio=100.0)
    policy.on_blocks_stored("a", [1], 0.0)
    route = [("x1", "x"), ("y1", "y"), ("x2", "x"), ("x3", "x"), ("x4", "x")]
    chosen = [
        policy.choose_prefill(req(r, [1, 100 + i, 200 + i, 300 + i], c), [A, B], 0.0)
        for i, (r, c) in enumerate(route)
    ]
    # x spends its local deficit on a (100 → 52 → 4 → -44) while y still has 52 there: x4 spills
    assert chosen == ["a", "a", "a", "a", "b"]
    assert policy.num_spills == 1
    policy.check_consistency()


def _overloaded_a(policy: D2LPMPolicy, x_over_share: bool) -> str:
    policy.on_blocks_stored("a", [1], 0.0)
    policy.choose_prefill(req("z1", [50, 51, 52, 53], "z"), [A], 0.0)  # load(a) = 64
    if x_over_share:  # x spends 160 of its 100-token share elsewhere; its prefill is done
        policy.choose_prefill(req("x0", list(range(60, 70)), "x"), [C], 0.0)
        policy.on_prefill_done("x0", 0.0, ttft_s=0.0)
    # loads 64 / 0 / 0: a is over 1.5 × the mean but not over 3 × it
    return policy.choose_prefill(req("x1", [1, 2, 3, 4], "x"), [A, B, C], 0.0)


def test_an_overloaded_cache_instance_is_skipped_by_a_client_within_its_share() -> None:
    assert _overloaded_a(d2lpm(), x_over_share=False) == "b"


def test_a_client_over_its_share_stays_with_its_cache_unless_saturated() -> None:
    policy = d2lpm()
    assert _overloaded_a(policy, x_over_share=True) == "a"
    assert policy.router_deficit["x"] == -60 - 48
    assert _overloaded_a(d2lpm(saturate_ratio=2.0), x_over_share=True) == "b"


def test_load_drains_at_prefill_done_and_clients_leave_at_finish() -> None:
    policy = d2lpm()
    policy.choose_prefill(req("r", [1, 2], "x"), [A], 0.0)
    assert policy.load_tokens("a") == 32
    policy.on_prefill_done("r", 1.0, ttft_s=1.0)
    assert policy.load_tokens("a") == 0
    policy.on_finished("r", 2.0)
    policy.check_consistency()
    policy.choose_prefill(req("s", [3], "x"), [A], 3.0)  # x is active again: a fresh share
    assert policy.router_deficit["x"] == 100 - 16
