"""Exact orders of the instance-side admission orders, and the DLPM-like invariants."""

from __future__ import annotations

import math
import random

import pytest

from distserve.engine.admission import (
    AdmissionOrder,
    DLPMOrder,
    WaitingItem,
    available_admission_orders,
    make_admission_order,
)


def fill(order: AdmissionOrder, items: list[tuple[str, str, float, int]]) -> None:
    for rid, client, arrival, n in items:
        order.add(WaitingItem(rid, client, arrival, n))


def drain(order: AdmissionOrder, match: dict[str, int], per_step: int = 1) -> list[str]:
    """Admit up to ``per_step`` requests per step (uncached tokens = prompt − match) until empty."""
    admitted: list[str] = []
    while len(order):
        for taken, rid in enumerate(order.order(lambda r: match.get(r, 0)), start=1):
            item = order._items[rid]
            order.on_admitted(rid, item.num_prompt_tokens - match.get(rid, 0))
            admitted.append(rid)
            if taken == per_step:
                break
        order.check_consistency()
    return admitted


ITEMS = [("r0", "a", 0.0, 100), ("r1", "b", 1.0, 100), ("r2", "a", 2.0, 100), ("r3", "b", 3.0, 100)]


def test_registry() -> None:
    assert available_admission_orders() == ["dlpm", "fcfs", "lpm", "preble", "vtc"]
    with pytest.raises(ValueError, match="unknown admission order 'x'"):
        make_admission_order("x")
    with pytest.raises(ValueError, match=r"no option\(s\) \['q'\]"):
        make_admission_order("dlpm", q=1)


def test_fcfs_and_lpm_orders() -> None:
    fcfs, lpm = make_admission_order("fcfs"), make_admission_order("lpm")
    for order in (fcfs, lpm):
        fill(order, ITEMS)
    match = {"r1": 10, "r2": 50, "r3": 50}
    assert list(fcfs.order(match.get)) == ["r0", "r1", "r2", "r3"]
    assert list(lpm.order(lambda r: match.get(r, 0))) == ["r2", "r3", "r1", "r0"]


def test_resumed_requests_go_first_and_are_not_charged_again() -> None:
    order = make_admission_order("dlpm", quantum=1000)
    fill(order, ITEMS)
    order.add(WaitingItem("old", "a", 9.0, 500), is_resumed=True)
    assert next(iter(order.order(lambda r: 0))) == "old"
    order.on_admitted("old", 500)
    assert isinstance(order, DLPMOrder) and order.deficit.get("a", 0.0) == 0.0


def test_order_yields_each_request_once_even_if_nothing_is_admitted() -> None:
    for name in available_admission_orders():
        order = make_admission_order(name)
        fill(order, ITEMS)
        assert sorted(order.order(lambda r: 0)) == ["r0", "r1", "r2", "r3"], name


def test_preble_groups_by_hit_ratio_round_robin_with_growing_quotas() -> None:
    order = make_admission_order("preble", per_group_quota=1)  # group g admits g + 1 per visit
    # hit ratios: 0.95 → group 9, 0.15 → group 1, 0.0 → group 0
    items = [(f"h{i}", "c", float(i), 100) for i in range(12)] + [
        ("m0", "c", 20.0, 100),
        ("m1", "c", 21.0, 100),
        ("m2", "c", 22.0, 100),
        ("z0", "c", 30.0, 100),
        ("z1", "c", 31.0, 100),
    ]
    fill(order, items)
    match = {**{f"h{i}": 95 for i in range(12)}, "m0": 15, "m1": 15, "m2": 15}
    # one visit each: g0 → 1 (z0), g1 → 2 (m0, m1), g9 → 10 (h0..h9); then g0, g1, g9 again
    expected = ["z0", "m0", "m1", *[f"h{i}" for i in range(10)], "z1", "m2", "h10", "h11"]
    assert drain(order, match, per_step=100) == expected


def test_preble_visit_resumes_where_a_step_stopped() -> None:
    order = make_admission_order("preble", per_group_quota=2)
    fill(order, [(f"r{i}", "c", float(i), 10) for i in range(5)])  # all in group 0, quota 2
    assert drain(order, {}, per_step=1) == ["r0", "r1", "r2", "r3", "r4"]


def test_preble_visit_ends_at_its_token_quota() -> None:
    # per_group_tokens=100: group 0 may admit 100 uncached tokens per visit, group 9 1000
    order = make_admission_order("preble", per_group_quota=10, per_group_tokens=100)
    misses = [(f"m{i}", "c", float(i), 300) for i in range(3)]  # group 0, 300 uncached each
    hits = [(f"h{i}", "c", 10.0 + i, 300) for i in range(4)]  # 290 cached: group 9
    fill(order, misses + hits)
    match = {f"h{i}": 290 for i in range(4)}
    # the first miss alone uses group 0's visit; the hits all fit group 9's; then m1, m2
    assert drain(order, match, per_step=1) == ["m0", "h0", "h1", "h2", "h3", "m1", "m2"]


def test_preble_rejects_empty_quotas() -> None:
    with pytest.raises(ValueError, match="per_group_tokens must be >= 1"):
        make_admission_order("preble", per_group_tokens=0)


def test_dlpm_with_infinite_quantum_is_lpm() -> None:
    rng = random.Random(0)
    items = [(f"r{i}", f"c{rng.randrange(3)}", float(i), rng.randrange(10, 500)) for i in range(40)]
    match = {f"r{i}": rng.randrange(0, 8) * 16 for i in range(40)}
    dlpm, lpm = make_admission_order("dlpm", quantum=math.inf), make_admission_order("lpm")
    fill(dlpm, items)
    fill(lpm, items)
    assert drain(dlpm, match, per_step=3) == drain(lpm, match, per_step=3)


def test_dlpm_with_nothing_cached_is_deficit_round_robin() -> None:
    order = make_admission_order("dlpm", quantum=100)
    fill(
        order,
        [
            ("a1", "A", 0, 300),
            ("b1", "B", 1, 50),
            ("a2", "A", 2, 50),
            ("b2", "B", 3, 50),
            ("b3", "B", 4, 50),
        ],
    )
    # round 1: both get 100; A takes a1 (-200), B takes b1, b2 (0); round 2: B takes b3 (50);
    # A needs two more quanta before a2
    assert drain(order, {}) == ["a1", "b1", "b2", "b3", "a2"]
    assert isinstance(order, DLPMOrder) and order.deficit == {"A": 50.0, "B": 50.0}


def test_dlpm_refills_only_when_a_pass_admits_nothing() -> None:
    order = make_admission_order("dlpm", quantum=100)
    fill(order, [("a1", "A", 0, 60), ("a2", "A", 1, 60), ("b1", "B", 2, 60)])
    steps = order.order(lambda r: 0)
    assert next(steps) == "a1"  # first pass found nobody eligible: both refilled to 100
    order.on_admitted("a1", 60)  # A: 40
    assert next(steps) == "a2"
    order.on_admitted("a2", 60)  # A: -20
    assert next(steps) == "b1"
    assert isinstance(order, DLPMOrder) and order.deficit == {"A": -20.0, "B": 100.0}


def test_dlpm_charges_only_uncached_input_and_generated_output() -> None:
    order = make_admission_order("dlpm", quantum=1000, w_out=2.0)
    fill(order, [("r", "A", 0, 500)])
    list(order.order(lambda r: 400))
    order.on_admitted("r", 100)
    order.on_output_tokens("A", 10)
    assert isinstance(order, DLPMOrder) and order.deficit["A"] == 1000 - 100 - 20


def _charged_service_gap(order_name: str, quantum: float, steps: int = 400) -> tuple[float, float]:
    """Two continuously backlogged clients; A's prompts are mostly cached, B's never.
    Returns (max gap in charged service, largest single request charge)."""
    rng = random.Random(1)
    order = make_admission_order(
        order_name, **({"quantum": quantum} if order_name == "dlpm" else {})
    )
    match: dict[str, int] = {}
    charged = {"A": 0.0, "B": 0.0}
    gap = largest = 0.0
    n = 0

    def refill(client: str) -> None:
        nonlocal n
        while sum(1 for it in order._items.values() if it.client_id == client) < 4:
            size = rng.randrange(50, 400)
            rid = f"{client}{n}"
            n += 1
            match[rid] = size - 20 if client == "A" else 0
            order.add(WaitingItem(rid, client, float(n), size))

    for _ in range(steps):
        refill("A")
        refill("B")
        rid = next(iter(order.order(lambda r: match[r])))
        item = order._items[rid]
        cost = item.num_prompt_tokens - match[rid]
        order.on_admitted(rid, cost)
        out = rng.randrange(1, 30)
        order.on_output_tokens(item.client_id, out)
        charged[item.client_id] += cost + 2 * out
        largest = max(largest, cost + 2 * out)
        gap = max(gap, abs(charged["A"] - charged["B"]))
    return gap, largest


def test_dlpm_keeps_the_charged_service_gap_of_two_backlogged_clients_bounded() -> None:
    for quantum in (50.0, 500.0, 5000.0):
        gap, largest = _charged_service_gap("dlpm", quantum)
        assert gap <= 2 * (quantum + largest), (quantum, gap, largest)
    lpm_gap, _ = _charged_service_gap("lpm", math.inf)
    assert lpm_gap > 10 * (500 + 460)  # plain LPM starves the uncached client: unbounded


def test_vtc_serves_the_smallest_counter_and_lifts_newcomers() -> None:
    order = make_admission_order("vtc")
    fill(order, [("a1", "A", 0, 100), ("a2", "A", 1, 100), ("b1", "B", 2, 10)])
    # after a1: A=100 > B=0, so b1; then only A waits
    assert drain(order, {}) == ["a1", "b1", "a2"]
    order.on_output_tokens("A", 5)  # A = 210
    fill(order, [("b2", "B", 3, 10), ("c1", "C", 4, 10)])
    # B became backlogged while nobody waited: kept at 10; C joined B: lifted from 0 to 10
    assert order.counter == {"A": 210.0, "B": 10.0, "C": 10.0}
    assert drain(order, {}) == ["b2", "c1"]
