from __future__ import annotations

from distserve.engine.kv_manager import KVCacheManager
from tests.engine.conftest import make_request


def _run_prefill(kv: KVCacheManager, req) -> None:
    cached = kv.find_cached_prefix(req)
    req.num_computed_tokens = len(cached) * kv.block_size
    assert kv.allocate(req, req.num_tokens - req.num_computed_tokens, cached)
    req.num_computed_tokens = req.num_tokens
    kv.cache_computed_blocks(req)


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(1, 13)))  # exactly 3 full blocks
    _run_prefill(kv, a)
    assert kv.block_ids("a") == [0, 1, 2]
    b = make_request("b", list(range(1, 13)))
    hits = kv.find_cached_prefix(b)
    # All 12 tokens are cached, but the last block is left to compute so there are logits.
    assert [h.block_id for h in hits] == [0, 1]
    c = make_request("c", list(range(1, 9)) + [99, 98, 97, 96, 95])
    assert [h.block_id for h in kv.find_cached_prefix(c)] == [0, 1]
    _run_prefill(kv, c)
    assert kv.block_ids("c")[:2] == [0, 1] and kv.pool.blocks[0].ref_count == 2
    kv.check_consistency()


def test_allocation_fails_cleanly_and_free_returns_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_request("a", list(range(1, 10)))  # needs 3 blocks
    assert kv.allocate(a, 9)
    b = make_request("b", [5, 6])
    assert not kv.allocate(b, 2)
    assert kv.block_ids("b") == [] and kv.num_free_blocks == 0
    kv.free("a")
    assert kv.num_free_blocks == 3
    assert kv.allocate(b, 2)
    kv.check_consistency()


def test_free_cached_hits_count_against_capacity():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    _run_prefill(kv, a)  # blocks 0,1 cached (full), block 2 partial
    kv.free("a")
    b = make_request("b", [1, 2, 3, 4, 9, 9, 9])  # hits blocks 0,1 (both free), then needs 2 more
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 2
    b.num_computed_tokens = 4
    # 2 hits leave the free queue, 1 block remains: not enough for 3 new tokens (2 blocks).
    assert not kv.can_allocate(b, 3, hits)
    assert kv.can_allocate(b, 2, hits)
