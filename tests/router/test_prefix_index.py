"""Exact-state tests of the router's prefix index."""

from __future__ import annotations

import pytest

from distserve.engine.block_hash import block_hashes
from distserve.router.prefix_index import PrefixIndex


def make_index(*instances: str, capacity: int | None = None) -> PrefixIndex:
    index = PrefixIndex(window_s=10.0)
    for iid in instances:
        index.add_instance(iid, capacity_blocks=capacity)
    return index


def test_match_counts_leading_blocks_per_instance() -> None:
    index = make_index("a", "b", "c")
    index.insert("a", [1, 2, 3, 4], now_s=0.0)
    index.insert("b", [1, 2, 5], now_s=1.0)
    index.blocks_stored("c", [1], now_s=2.0)
    assert index.match([1, 2, 3, 4, 9]) == {"a": 4, "b": 2, "c": 1}
    assert index.match([1, 2, 5]) == {"a": 2, "b": 3, "c": 1}
    assert index.match([7, 1]) == {}
    assert index.deepest_present([1, 2, 5, 7]) == 3
    assert index.is_branch(2) and not index.is_branch(1)
    index.check_consistency()


def test_match_requires_a_contiguous_prefix() -> None:
    index = make_index("a")
    index.insert("a", [1, 2, 3], now_s=0.0)
    index.blocks_evicted("a", [2])
    assert index.match([1, 2, 3]) == {"a": 1}
    index.check_consistency()


def test_works_with_engine_block_hashes() -> None:
    index = make_index("a")
    shared = list(range(32))
    h1 = block_hashes([*shared, *range(100, 116)], block_size=16)
    h2 = block_hashes([*shared, *range(200, 216)], block_size=16)
    index.insert("a", h1, now_s=0.0)
    assert index.match(h2) == {"a": 2}


def test_evicted_events_update_holders_and_collect_garbage() -> None:
    index = make_index("a", "b")
    index.insert("a", [1, 2, 3], now_s=0.0)
    index.insert("b", [1, 2], now_s=0.0)
    index.blocks_evicted("a", [3, 2])
    assert index.match([1, 2, 3]) == {"a": 1, "b": 2}
    assert len(index) == 2  # block 3 was held by nobody and had no child: collected
    assert list(index.lru_blocks("a")) == [1]
    index.blocks_evicted("b", [2, 1])
    index.blocks_evicted("a", [1])
    assert len(index) == 0
    index.check_consistency()


def test_eviction_of_an_unknown_block_or_instance_is_ignored() -> None:
    index = make_index("a")
    index.blocks_evicted("a", [42])
    index.blocks_evicted("zzz", [1])
    index.check_consistency()


def test_lru_order_touches_leaves_first_so_prefixes_survive() -> None:
    index = make_index("a", capacity=3)
    index.insert("a", [1, 2, 3], now_s=0.0)
    assert list(index.lru_blocks("a")) == [3, 2, 1]
    index.insert("a", [1, 2, 4], now_s=1.0)  # over capacity: the oldest (3) goes
    assert list(index.lru_blocks("a")) == [4, 2, 1]
    assert index.match([1, 2, 3]) == {"a": 2}
    index.check_consistency()


def test_remove_instance_drops_only_its_blocks() -> None:
    index = make_index("a", "b")
    index.insert("a", [1, 2, 3], now_s=0.0)
    index.insert("b", [1, 5], now_s=0.0)
    assert index.remove_instance("a") == 3
    assert index.match([1, 2, 3]) == {"b": 1}
    assert index.match([1, 5]) == {"b": 2}
    assert index.instances == ["b"]
    index.check_consistency()


def test_request_counts_are_windowed() -> None:
    index = make_index("a")
    index.insert("a", [1, 2], now_s=0.0)
    index.record_request([1, 2], now_s=0.0)
    index.record_request([1], now_s=5.0)
    assert index.num_requests(1, now_s=6.0) == 2
    assert index.num_requests(1, now_s=12.0) == 1  # the request at t=0 left the 10 s window
    assert index.num_requests(2, now_s=12.0) == 0


def test_events_for_unregistered_instance_raise() -> None:
    index = make_index("a")
    with pytest.raises(KeyError, match="add_instance"):
        index.blocks_stored("nope", [1])


def test_num_cached_counts_one_instances_leading_blocks() -> None:
    index = make_index("a", "b")
    index.insert("a", [1, 2, 3], now_s=0.0)
    index.insert("b", [1, 5], now_s=0.0)
    assert index.num_cached("a", [1, 2, 3, 4]) == 3
    assert index.num_cached("b", [1, 2, 3]) == 1
    assert index.num_cached("b", [2, 3]) == 0


def test_listener_hears_every_holder_change_of_watched_hashes_only() -> None:
    index = make_index("a", "b", capacity=3)
    heard: list[tuple[int, str, bool]] = []
    index.set_holder_listener(lambda h, iid, added: heard.append((h, iid, added)))
    index.watch(1)
    index.watch(3)
    index.insert("a", [1, 2, 3], now_s=0.0)  # leaf first: 3 then 1
    index.insert("a", [1, 2, 3], now_s=1.0)  # a touch, not a change
    index.blocks_stored("b", [1], now_s=1.0)
    assert heard == [(3, "a", True), (1, "a", True), (1, "b", True)]
    heard.clear()
    index.insert("a", [1, 2, 4], now_s=2.0)  # over capacity: a's LRU block 3 is dropped
    index.blocks_evicted("b", [1])
    index.unwatch(3)
    index.remove_instance("a")
    assert heard == [(3, "a", False), (1, "b", False), (1, "a", False)]
    index.check_consistency()
