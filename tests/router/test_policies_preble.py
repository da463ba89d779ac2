"""Exact decisions of the Preble-E2-like policy on small hand-built cases.

Costs are made exact with ``prefill_time=(0, 1/16, 0, 0)``: a missed node costs its length in
16-token blocks (seconds), and colocated instances with TPOT 0 add no decode cost.
"""

from __future__ import annotations

from distserve.router.policies import InstanceLoad, RouteRequest, make_policy
from distserve.router.policies.preble import PreblePolicy

BS = 16
BLOCKS = (0.0, 1.0 / BS, 0.0, 0.0)


def req(rid: str, hashes: list[int], num_tokens: int | None = None, out: int = 1) -> RouteRequest:
    n = num_tokens if num_tokens is not None else len(hashes) * BS
    return RouteRequest(rid, "c0", n, tuple(hashes), BS, out, 0.0)


def inst(iid: str, role: str = "colocated") -> InstanceLoad:
    return InstanceLoad(instance_id=iid, role=role, recent_tpot_s=0.0)


A, B = inst("a"), inst("b")


def preble(**options: object) -> PreblePolicy:
    defaults: dict[str, object] = {"prefill_time": BLOCKS, "explore_hit_ratio": None}
    policy = make_policy("preble", **{**defaults, **options})
    assert isinstance(policy, PreblePolicy)
    return policy


def test_exploit_needs_matched_strictly_greater_than_missed() -> None:
    policy = preble()
    policy.on_blocks_stored("a", [1, 2], 0.0)  # a holds 2 of the 4 blocks, and has no load
    # matched 32 == missed 32: a tie explores; loads tie, so the first listed instance (b) wins
    assert policy.choose_prefill(req("tie", [1, 2, 3, 4]), [B, A], 0.0) == "b"
    # a partial last block: matched 32 > missed 31 exploits the holder of the deepest block
    assert policy.choose_prefill(req("more", [1, 2, 5], num_tokens=63), [B, A], 0.0) == "a"
    policy.check_consistency()


def test_exploit_picks_the_lightest_holder_of_the_deepest_matched_block() -> None:
    policy = preble()
    policy.choose_prefill(req("x", [7, 8, 9]), [A], 0.0)  # a: +3 (missed node of 3 blocks)
    policy.on_blocks_stored("b", [1, 2, 3], 0.0)
    policy.on_blocks_stored("a", [1, 2, 3], 0.0)
    assert policy.choose_prefill(req("y", [1, 2, 3, 4]), [A, B], 0.0) == "b"


def test_load_is_updated_at_dispatch_time() -> None:
    policy = preble()
    loads = [A, B]  # the same stale snapshot for a burst
    chosen = [policy.choose_prefill(req(f"r{i}", [100 + i, 200 + i]), loads, 0.0) for i in range(4)]
    assert chosen == ["a", "b", "a", "b"]


def _route(
    policy: PreblePolicy, rid: str, hashes: list[int], to: InstanceLoad, n: int | None = None
) -> None:
    assert policy.choose_prefill(req(rid, hashes, n), [to], 0.0) == to.instance_id


def _hot_loads(policy: PreblePolicy, b_tokens: int) -> None:
    """Hot-node loads (what rebalancing compares): a = h (cost 1) + g (cost 5) = 6, plus a cold
    node that does not count; b = one hot node k of b_tokens / 16."""
    for rid, hashes in [("h1", [1]), ("h2", [1]), ("g1", [2, 3, 4, 5, 6]), ("g2", [2, 3, 4, 5, 6])]:
        _route(policy, rid, hashes, A)  # the second request of each exploits: a hit, no cost
    _route(policy, "u", [11, 12, 13], A)  # one request: not hot
    _route(policy, "k1", [21, 22, 23, 24, 25], B, n=b_tokens)
    _route(policy, "k2", [21, 22, 23, 24, 25], B, n=b_tokens)


def test_rebalancing_triggers_at_one_and_a_half_times_the_lightest_load() -> None:
    policy = preble(warmup_requests_per_instance=0)
    _hot_loads(policy, b_tokens=4 * BS)
    assert (policy.hot_load(A), policy.hot_load(B)) == (6.0, 4.0)
    assert policy.load_cost(A) == 9.0  # routing sees every charge, rebalancing only hot nodes
    # 6 >= 1.5 × 4: move the cheapest hot node h (5 >= 5 does not overshoot), not g
    policy.rebalance([A, B], 0.0)
    assert (policy.hot_load(A), policy.hot_load(B)) == (5.0, 5.0)
    assert set(policy.index.holders(1)) == {"b"} and set(policy.index.holders(2)) == {"a"}
    assert policy.num_moves == 1
    policy.check_consistency()


def test_rebalancing_stays_put_just_below_the_trigger() -> None:
    policy = preble(warmup_requests_per_instance=0)
    _hot_loads(policy, b_tokens=4 * BS + 1)  # 6 / 4.0625 < 1.5
    policy.rebalance([A, B], 0.0)
    assert policy.num_moves == 0 and set(policy.index.holders(1)) == {"a"}


def test_rebalancing_waits_for_the_warm_up() -> None:
    policy = preble(warmup_requests_per_instance=4)  # 8 dispatches needed, 7 made
    _hot_loads(policy, b_tokens=4 * BS)
    policy.rebalance([A, B], 0.0)
    assert policy.num_moves == 0


def _hot_prefix_with_ttfts(policy: PreblePolicy, ttfts: list[float]) -> None:
    for i, ttft in enumerate(ttfts):
        policy.choose_prefill(req(f"h{i}", [1, 2]), [A], float(i))
        policy.on_prefill_done(f"h{i}", float(i), ttft_s=ttft)


def test_the_busiest_instances_single_hot_prefix_is_replicated_when_its_ttft_doubled() -> None:
    policy = preble(warmup_requests_per_instance=0)
    _hot_prefix_with_ttfts(policy, [0.1, 0.1, 0.1, 0.25, 0.25, 0.25])
    policy.rebalance([A, B], 6.0)  # newer-half mean 0.25 >= 2 × older-half mean 0.1
    assert policy.num_replications == 1
    assert set(policy.index.holders(1)) == {"a", "b"}
    # future requests for the prefix may go to either holder: the lighter one, b, wins
    assert policy.choose_prefill(req("next", [1, 2, 3]), [A, B], 6.0) == "b"
    policy.check_consistency()


def test_no_replication_when_ttft_grew_less_than_twice() -> None:
    policy = preble(warmup_requests_per_instance=0)
    _hot_prefix_with_ttfts(policy, [0.1, 0.1, 0.1, 0.19, 0.19, 0.19])
    policy.rebalance([A, B], 6.0)
    assert policy.num_replications == 0 and set(policy.index.holders(1)) == {"a"}


def test_explore_prefers_an_instance_with_a_high_recent_hit_ratio() -> None:
    policy = preble(explore_hit_ratio=0.7)
    policy.choose_prefill(req("w1", [1, 2, 3, 4]), [B], 0.0)
    policy.choose_prefill(req("w2", [1, 2, 3, 4]), [B], 0.0)  # b's hit ratio: 4 / 8 = 0.5
    assert policy.choose_prefill(req("x", [9]), [B, A], 0.0) == "a"  # plain explore: a is idle
    for i in range(4):
        policy.choose_prefill(req(f"w{i + 3}", [1, 2, 3, 4]), [B], 0.0)  # 20 / 24 >= 0.7
    assert policy.choose_prefill(req("y", [8]), [A, B], 0.0) == "b"


def test_prefill_only_instances_count_pending_prefill_time() -> None:
    policy = preble()
    pa = inst("pa", "prefill")
    policy.choose_prefill(req("r1", [1, 2]), [pa], 0.0)
    assert policy.load_cost(pa) == 4.0  # 2 (window charge) + 2 (pending prefill)
    policy.on_prefill_done("r1", 1.0, ttft_s=1.0)
    assert policy.load_cost(pa) == 2.0
    policy.on_finished("r1", 2.0)
    policy.check_consistency()
