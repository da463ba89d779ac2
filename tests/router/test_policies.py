"""Registry, dispatch-time bookkeeping, and the baseline and SGLang-like policies."""

from __future__ import annotations

import pytest

from distserve.router.policies import InstanceLoad, RouteRequest, available_policies, make_policy

BS = 16


def req(
    rid: str,
    hashes: list[int] | tuple[int, ...],
    num_tokens: int | None = None,
    client: str = "c0",
    out: int = 1,
    t: float = 0.0,
) -> RouteRequest:
    return RouteRequest(
        request_id=rid,
        client_id=client,
        num_prompt_tokens=num_tokens if num_tokens is not None else len(hashes) * BS,
        block_hashes=tuple(hashes),
        block_size=BS,
        expected_output_tokens=out,
        arrival_s=t,
    )


def inst(
    iid: str, role: str = "prefill", free: int = 0, total: int = 0, tpot: float | None = None
) -> InstanceLoad:
    return InstanceLoad(
        instance_id=iid, role=role, free_kv_blocks=free, total_kv_blocks=total, recent_tpot_s=tpot
    )


def test_registry_lists_all_policies_and_rejects_unknown_names_and_options() -> None:
    assert available_policies() == ["cache_aware", "d2lpm", "least_load", "preble", "round_robin"]
    with pytest.raises(ValueError, match=r"unknown routing policy 'nope'.*round_robin"):
        make_policy("nope")
    with pytest.raises(ValueError, match=r"no option\(s\) \['colour'\].*cache_threshold"):
        make_policy("cache_aware", colour="red")
    assert make_policy("preble", window_s=60.0).name == "preble"


def test_round_robin_cycles_in_list_order() -> None:
    policy = make_policy("round_robin")
    loads = [inst("a"), inst("b"), inst("c")]
    chosen = [policy.choose_prefill(req(f"r{i}", [i]), loads, 0.0) for i in range(4)]
    assert chosen == ["a", "b", "c", "a"]


def test_least_load_counts_dispatches_immediately_and_drains_on_prefill_done() -> None:
    policy = make_policy("least_load")
    loads = [inst("a"), inst("b")]  # a stale snapshot: the policy must not rely on it
    assert policy.choose_prefill(req("r1", [1], num_tokens=100), loads, 0.0) == "a"
    assert policy.choose_prefill(req("r2", [2], num_tokens=50), loads, 0.0) == "b"
    assert policy.choose_prefill(req("r3", [3], num_tokens=10), loads, 0.0) == "b"
    assert policy.outstanding_prefill_tokens("b") == 60
    policy.on_prefill_done("r1", 1.0, ttft_s=1.0)
    assert policy.choose_prefill(req("r4", [4]), loads, 1.0) == "a"
    policy.check_consistency()


def test_default_decode_choice_prefers_free_kv_net_of_dispatches() -> None:
    policy = make_policy("round_robin")
    prefill = [inst("p")]
    decode = [inst("d0", "decode", free=100, total=100), inst("d1", "decode", free=90, total=100)]
    for i in range(3):
        policy.choose_prefill(req(f"r{i}", [i], num_tokens=16 * 10, out=16 * 5), prefill, 0.0)
    # 15 blocks' worth per request: d0 has 100, then 85 left vs d1's 90, then 85 vs 75
    assert [
        policy.choose_decode(req(f"r{i}", [i], num_tokens=160, out=80), decode, 0.0)
        for i in range(3)
    ] == [
        "d0",
        "d1",
        "d0",
    ]
    for i in range(3):
        policy.on_finished(f"r{i}", 1.0)
    assert policy.outstanding_decode_tokens("d0") == 0
    policy.check_consistency()


def test_routing_a_request_twice_or_with_no_instance_is_an_error() -> None:
    policy = make_policy("round_robin")
    policy.choose_prefill(req("r", [1]), [inst("a")], 0.0)
    with pytest.raises(ValueError, match="already routed"):
        policy.choose_prefill(req("r", [1]), [inst("a")], 0.0)
    with pytest.raises(ValueError, match="no prefill instance"):
        policy.choose_prefill(req("s", [1]), [], 0.0)


def test_cache_aware_follows_a_match_above_the_threshold() -> None:
    policy = make_policy("cache_aware")
    loads = [inst("a"), inst("b")]
    policy.on_blocks_stored("b", [1, 2], 0.0)
    # 2 of 6 blocks cached = 0.33 > 0.3: go to b
    assert policy.choose_prefill(req("r1", [1, 2, 3, 4, 5, 6]), loads, 0.0) == "b"
    # 1 of 4 blocks = 0.25 <= 0.3: the smallest tree (a holds nothing)
    assert policy.choose_prefill(req("r2", [1, 9, 9, 9]), loads, 0.0) == "a"
    policy.check_consistency()


def test_cache_aware_sends_to_least_loaded_when_imbalanced() -> None:
    policy = make_policy("cache_aware", balance_abs_threshold=2, balance_rel_threshold=1.5)
    loads = [inst("a"), inst("b")]
    policy.on_blocks_stored("a", [1], 0.0)
    for i in range(3):  # full matches pile onto a while max - min <= 2
        assert policy.choose_prefill(req(f"r{i}", [1]), loads, 0.0) == "a"
    # now max - min = 3 > 2 and 3 > 1.5 * 0: the cached instance is skipped
    assert policy.choose_prefill(req("r9", [1]), loads, 0.0) == "b"
