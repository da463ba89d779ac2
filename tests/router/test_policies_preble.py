"""Exact decisions of the Preble-E2-like policy on small hand-built cases.

Costs are made exact with ``prefill_time=(0, 1/16, 0, 0)``: a missed 16-token block costs one
second and there is no per-batch constant; colocated instances with TPOT 0 add no decode cost.
``load_horizon_s=180`` (= the window) reads the window cost as Preble's literal sum, so
``load cost = W + pending prefill``; ``load_horizon_s=0`` leaves the pending prefill alone.
"""

from __future__ import annotations

import pytest

from distserve.router.policies import InstanceLoad, RouteRequest, make_policy
from distserve.router.policies.preble import PreblePolicy

BS = 16
BLOCKS = (0.0, 1.0 / BS, 0.0, 0.0)


def req(rid: str, hashes: list[int], num_tokens: int | None = None, out: int = 1) -> RouteRequest:
    n = num_tokens if num_tokens is not None else len(hashes) * BS
    return RouteRequest(rid, "c0", n, tuple(hashes), BS, out, 0.0)


def inst(iid: str, role: str = "colocated", free: int = 0, total: int = 0) -> InstanceLoad:
    return InstanceLoad(
        instance_id=iid, role=role, recent_tpot_s=0.0, free_kv_blocks=free, total_kv_blocks=total
    )


A, B, C = inst("a"), inst("b"), inst("c")


def preble(**options: object) -> PreblePolicy:
    defaults: dict[str, object] = {"prefill_time": BLOCKS, "load_horizon_s": 180.0}
    policy = make_policy("preble", **{**defaults, **options})
    assert isinstance(policy, PreblePolicy)
    return policy


def done(policy: PreblePolicy, *rids: str) -> None:
    for rid in rids:
        policy.on_prefill_done(rid, 0.0, ttft_s=None)
        policy.on_finished(rid, 0.0)


# ---- exploit / explore ---------------------------------------------------------------------


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
    policy.choose_prefill(req("x", [7, 8, 9]), [A], 0.0)  # a: W 3 + pending 3
    policy.on_blocks_stored("b", [1, 2, 3], 0.0)
    policy.on_blocks_stored("a", [1, 2, 3], 0.0)
    assert policy.choose_prefill(req("y", [1, 2, 3, 4]), [A, B], 0.0) == "b"


def test_load_is_updated_at_dispatch_time() -> None:
    policy = preble()
    loads = [A, B]  # the same stale snapshot for a burst
    chosen = [policy.choose_prefill(req(f"r{i}", [100 + i, 200 + i]), loads, 0.0) for i in range(4)]
    assert chosen == ["a", "b", "a", "b"]


def test_explore_adds_the_eviction_cost_of_hot_nodes_the_prompt_would_push_out() -> None:
    policy = preble(load_horizon_s=0.0)  # load cost = pending prefill only
    a, b = inst("a", free=1, total=4), inst("b", free=100, total=104)
    for rid in ("h1", "h2"):  # node [1, 2] on a, two requests: hot
        policy.choose_prefill(req(rid, [1, 2]), [a], 0.0)
    done(policy, "h1", "h2")
    policy.choose_prefill(req("busy", [50]), [b], 0.0)  # b: 1 s pending
    # a is idle but must evict 2 blocks, i.e. the hot node: (2 − 1) requests × 2 s = 2 > 1
    assert policy.choose_prefill(req("x", [9, 8, 7]), [a, b], 0.0) == "b"


def test_explore_ignores_the_eviction_of_a_node_used_once() -> None:
    policy = preble(load_horizon_s=0.0)
    a, b = inst("a", free=1, total=4), inst("b", free=100, total=104)
    policy.choose_prefill(req("h1", [1, 2]), [a], 0.0)
    done(policy, "h1")
    policy.choose_prefill(req("busy", [50]), [b], 0.0)
    assert policy.choose_prefill(req("x", [9, 8, 7]), [a, b], 0.0) == "a"


def test_explore_prefers_an_instance_with_a_high_recent_hit_ratio_when_enabled() -> None:
    policy = preble(explore_hit_ratio=0.7)
    policy.choose_prefill(req("w1", [1, 2, 3, 4]), [B], 0.0)
    policy.choose_prefill(req("w2", [1, 2, 3, 4]), [B], 0.0)  # b's hit ratio: 4 / 8 = 0.5
    assert policy.choose_prefill(req("x", [9]), [B, A], 0.0) == "a"  # plain explore: a is idle
    for i in range(4):
        policy.choose_prefill(req(f"w{i + 3}", [1, 2, 3, 4]), [B], 0.0)  # 20 / 24 >= 0.7
    assert policy.choose_prefill(req("y", [8]), [A, B], 0.0) == "b"


# ---- load cost -------------------------------------------------------------------------------


def test_a_request_charges_its_whole_miss_and_holders_share_a_nodes_cost() -> None:
    policy = preble()
    policy.choose_prefill(req("r1", [1, 2, 3]), [A], 0.0)  # a miss of 3 blocks: C = 3
    assert (policy.load.share("a"), policy.load.share("b")) == (3.0, 0.0)
    policy.on_blocks_stored("b", [1, 2, 3], 0.0)  # a second holder takes half at once
    assert (policy.load.share("a"), policy.load.share("b")) == (1.5, 1.5)
    # a hit on the prefix still charges its own uncached suffix block: C = 4, shared
    assert policy.choose_prefill(req("r2", [1, 2, 3, 4]), [A, B], 0.0) == "b"
    assert (policy.load.share("a"), policy.load.share("b")) == (2.0, 2.0)
    assert (policy.load_cost(A), policy.load_cost(B)) == (5.0, 3.0)  # + pending 3 and 1
    policy.on_blocks_evicted("a", [3, 2, 1])
    assert (policy.load.share("a"), policy.load.share("b")) == (0.0, 4.0)
    policy.check_consistency()


def test_the_window_cost_is_scaled_to_the_load_horizon() -> None:
    policy = preble(load_horizon_s=10.0)  # window 180 s: W counts 10/180
    policy.choose_prefill(req("r1", list(range(1, 19))), [A], 0.0)  # W 18, pending 18
    assert policy.load_cost(A) == pytest.approx(18 * 10 / 180 + 18)


def test_prefill_only_instances_count_pending_prefill_time() -> None:
    policy = preble()
    pa = inst("pa", "prefill")
    policy.choose_prefill(req("r1", [1, 2]), [pa], 0.0)
    assert policy.load_cost(pa) == 4.0  # 2 (window charge) + 2 (pending prefill)
    policy.on_prefill_done("r1", 1.0, ttft_s=1.0)
    assert policy.load_cost(pa) == 2.0
    policy.on_finished("r1", 2.0)
    policy.check_consistency()


def test_queued_prompts_pay_the_batch_constant_once() -> None:
    policy = preble(prefill_time=(0.5, 1.0 / BS, 0.0, 0.0), load_horizon_s=0.0)
    for i in range(3):
        policy.choose_prefill(req(f"r{i}", [10 + i]), [A], 0.0)
    assert policy.load_cost(A) == 3.5  # 3 × 1 s + one 0.5 s constant, not three
    done(policy, "r0", "r1", "r2")
    assert policy.load_cost(A) == 0.0


# ---- replication by queue (adaptation c) -----------------------------------------------------


def test_a_hot_prefix_is_replicated_once_its_holders_queue_reaches_one_and_a_half_copies() -> None:
    policy = preble(load_horizon_s=0.0)
    loads = [A, B]
    assert policy.choose_prefill(req("r0", [1, 2, 100]), loads, 0.0) == "a"  # explore
    done(policy, "r0")
    # node [1, 2] (the branch appears with r1): a copy to b costs 2 s, so the trigger is a
    # queue >= 1.5 × (b's 0 + 2) = 3 s; each hit queues its 1-block suffix on a
    for i in (1, 2):
        assert policy.choose_prefill(req(f"r{i}", [1, 2, 100 + i]), loads, 0.0) == "a"
        assert policy.num_queue_replications == 0
    assert policy.choose_prefill(req("r3", [1, 2, 103]), loads, 0.0) == "a"  # queue 3 s
    assert policy.num_queue_replications == 1
    assert set(policy.index.holders(1)) == {"a", "b"}
    # exploit now splits the prefix by load; b's first request computes the copy itself
    assert policy.choose_prefill(req("r4", [1, 2, 104]), loads, 0.0) == "b"
    assert policy.in_flight.pending_prefill_s("b") == 3.0  # 2 blocks of copy + 1 of suffix
    policy.check_consistency()


def test_a_very_hot_prefix_keeps_gaining_replicas() -> None:
    policy = preble(load_horizon_s=0.0)
    loads = [A, B, C]
    policy.choose_prefill(req("r0", [1, 2, 100]), loads, 0.0)
    done(policy, "r0")
    chosen, holders = [], []
    for i in range(1, 8):  # nothing finishes: every holder's queue keeps growing
        chosen.append(policy.choose_prefill(req(f"r{i}", [1, 2, 100 + i]), loads, 0.0))
        holders.append(len(policy.index.holders(1)))
    # r3 fills a's queue to 3 s: copy to b; r4 goes to b and queues the copy + its suffix, so
    # both holders are at 3 s >= 1.5 × (c's 0 + 2): copy to c; then the three share the load
    assert chosen == ["a", "a", "a", "b", "c", "a", "b"]
    assert holders == [1, 1, 2, 3, 3, 3, 3]
    assert policy.num_queue_replications == 2
    policy.check_consistency()


def test_no_replication_while_the_lightest_is_as_busy() -> None:
    policy = preble(load_horizon_s=0.0)
    policy.choose_prefill(req("busy", list(range(50, 60))), [B], 0.0)  # b: 10 s queued
    policy.choose_prefill(req("r0", [1, 2, 100]), [A, B], 0.0)
    done(policy, "r0")
    for i in range(1, 8):
        assert policy.choose_prefill(req(f"r{i}", [1, 2, 100 + i]), [A, B], 0.0) == "a"
    assert policy.num_queue_replications == 0  # 7 s < 1.5 × (10 + 2)


# ---- rebalancing -----------------------------------------------------------------------------


def _route(
    policy: PreblePolicy, rid: str, hashes: list[int], to: InstanceLoad, n: int | None = None
) -> None:
    assert policy.choose_prefill(req(rid, hashes, n), [to], 0.0) == to.instance_id


def _hot_loads(policy: PreblePolicy, h_blocks: int, g_blocks: int, k_tokens: int) -> None:
    """Hot-node loads (what rebalancing compares), each request done at once: a = h + g, and a
    cold node that does not count; b = one hot node k of k_tokens / 16."""
    h, g = list(range(1, 1 + h_blocks)), list(range(11, 11 + g_blocks))
    for rid, hashes in [("h1", h), ("h2", h), ("g1", g), ("g2", g)]:
        _route(policy, rid, hashes, A)  # the second request of each is a hit: no charge
    _route(policy, "k1", list(range(31, 31 + -(-k_tokens // BS))), B, n=k_tokens)
    _route(policy, "k2", list(range(31, 31 + -(-k_tokens // BS))), B, n=k_tokens)
    done(policy, "h1", "h2", "g1", "g2", "k1", "k2")


def test_rebalancing_triggers_at_one_and_a_half_times_the_lightest_load() -> None:
    policy = preble(warmup_requests_per_instance=0)
    _hot_loads(policy, h_blocks=1, g_blocks=8, k_tokens=6 * BS)
    _route(policy, "u", [91, 92, 93], A)  # a: 3 s queued, a cold node that does not count
    assert (policy.load.hot_share("a"), policy.load.hot_share("b")) == (9.0, 6.0)
    # 9 >= 1.5 × 6: move the cheapest hot node h, as 9 − 1 >= 6 + 1 + its 1 s copy on b, and
    # a's 3 s queue >= 1.5 × (b's 0 + 1): then 8 < 1.5 × 7 stops
    policy.rebalance([A, B], 0.0)
    assert (policy.load.hot_share("a"), policy.load.hot_share("b")) == (8.0, 7.0)
    assert set(policy.index.holders(1)) == {"b"} and set(policy.index.holders(11)) == {"a"}
    assert policy.num_moves == 1
    policy.check_consistency()


def test_rebalancing_stays_put_just_below_the_trigger() -> None:
    policy = preble(warmup_requests_per_instance=0)
    _hot_loads(policy, h_blocks=1, g_blocks=8, k_tokens=6 * BS + 1)  # 9 / 6.0625 < 1.5
    _route(policy, "u", [91, 92, 93], A)
    policy.rebalance([A, B], 0.0)
    assert policy.num_moves == 0 and set(policy.index.holders(1)) == {"a"}


def test_a_move_must_not_overshoot_once_the_copy_is_counted() -> None:
    policy = preble(warmup_requests_per_instance=0)
    _hot_loads(policy, h_blocks=2, g_blocks=8, k_tokens=6 * BS)  # 10 >= 1.5 × 6
    _route(policy, "u", [91, 92, 93, 94, 95, 96], A)
    # Preble's own test passes (10 − 2 >= 6 + 2); with h's 2 s copy on b it overshoots
    policy.rebalance([A, B], 0.0)
    assert policy.num_moves == 0


def test_a_move_needs_a_queue_to_relieve() -> None:
    policy = preble(warmup_requests_per_instance=0)
    _hot_loads(policy, h_blocks=1, g_blocks=8, k_tokens=6 * BS)
    policy.rebalance([A, B], 0.0)  # a has nothing queued
    assert policy.num_moves == 0


def test_rebalancing_waits_for_the_warm_up() -> None:
    policy = preble(warmup_requests_per_instance=4)  # 8 dispatches needed, 7 made
    _hot_loads(policy, h_blocks=1, g_blocks=8, k_tokens=6 * BS)
    _route(policy, "u", [91, 92, 93], A)
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
    policy.choose_prefill(req("busy", [50]), [A], 6.0)
    assert policy.choose_prefill(req("next", [1, 2, 3]), [A, B], 6.0) == "b"
    policy.check_consistency()


def test_no_replication_when_ttft_grew_less_than_twice() -> None:
    policy = preble(warmup_requests_per_instance=0)
    _hot_prefix_with_ttfts(policy, [0.1, 0.1, 0.1, 0.19, 0.19, 0.19])
    policy.rebalance([A, B], 6.0)
    assert policy.num_replications == 0 and set(policy.index.holders(1)) == {"a"}


def test_state_leaves_with_the_window() -> None:
    policy = preble(window_s=10.0)
    policy.choose_prefill(req("r1", [1, 2]), [A], 0.0)
    policy.on_prefill_done("r1", 1.0, ttft_s=1.0)
    policy.on_finished("r1", 1.0)
    policy.choose_prefill(req("r2", [5]), [A], 20.0)  # r1's charge expires
    assert 1 not in policy.load and policy.load.share("a") == 1.0
    policy.check_consistency()


# ---- replication by sustained load (adaptation h) --------------------------------------------


def _steady_hits(policy: PreblePolicy, gap_s: float, count: int) -> None:
    """A prefix [1, 2] hit every ``gap_s`` seconds, each request prefilled before the next:
    the holder never has more than the request just sent queued (1 s of suffix)."""
    for i in range(count):
        t = i * gap_s
        policy.choose_prefill(req(f"r{i}", [1, 2, 100 + i]), [A, B], t)
        policy.on_prefill_done(f"r{i}", t, ttft_s=None)
        policy.on_finished(f"r{i}", t)


def test_a_holder_busy_without_a_backlog_gets_a_copy() -> None:
    policy = preble(load_horizon_s=3.0)
    _steady_hits(policy, gap_s=1.0, count=3)
    # r1 (t = 1): node [1, 2] is hot, C = 3 + 1 over 1 s of history (counted as the 3 s horizon);
    # a's load is its 1 s queue + 4 s of window work less its own 2 s computation of [1, 2],
    # 3 >= 1.5 × (b's 0 + the 2 s copy); the queue alone (1 s) is not, and W over the whole
    # 180 s window adds only 4 / 60 s
    assert policy.num_queue_replications == 1
    assert set(policy.index.holders(1)) == {"a", "b"}
    policy.check_consistency()


def test_a_prefix_hit_at_a_low_rate_is_not_copied() -> None:
    policy = preble(load_horizon_s=3.0)
    _steady_hits(policy, gap_s=20.0, count=6)
    # the same hits 20 s apart: a's window work is 3 + 5 over 100 s, 0.24 s per 3 s horizon
    # (0.18 s without its own computation of [1, 2]), plus the 1 s queue: < 1.5 × 2
    assert policy.num_queue_replications == 0
    assert set(policy.index.holders(1)) == {"a"}


# ---- a copy pays for what it evicts (adaptation i) -------------------------------------------


def test_a_copy_pays_for_the_hot_node_it_would_evict() -> None:
    policy = preble(load_horizon_s=0.0)
    a, b = inst("a", free=100, total=104), inst("b", free=2, total=2)
    for rid in ("k1", "k2"):  # b's whole cache: node [50, 51], hot
        policy.choose_prefill(req(rid, [50, 51]), [b], 0.0)
    done(policy, "k1", "k2")
    policy.choose_prefill(req("r0", [1, 2, 100]), [a], 0.0)
    done(policy, "r0")
    # b reports 2 free blocks, but both hold [50, 51]: copying [1, 2] there costs its 2 s and
    # the 2 s of recomputing [50, 51], so the trigger is a queue >= 1.5 × 4 s, not 1.5 × 2 s
    for i in range(1, 6):
        assert policy.choose_prefill(req(f"r{i}", [1, 2, 100 + i]), [a, b], 0.0) == "a"
    assert policy.num_queue_replications == 0  # a's queue: 5 s
    assert policy.choose_prefill(req("r6", [1, 2, 106]), [a, b], 0.0) == "a"
    assert policy.num_queue_replications == 1  # 6 s
    assert set(policy.index.holders(1)) == {"a", "b"}
    policy.check_consistency()
