from __future__ import annotations

import pytest

from distserve.engine.block_hash import ROOT_HASH, block_hashes, hash_block
from distserve.engine.block_pool import BlockPool


def test_block_hashes_are_chained_and_stable():
    tokens = list(range(40))
    hashes = block_hashes(tokens, 16)
    assert len(hashes) == 2  # the partial third block is not hashed
    assert hashes[0] == hash_block(ROOT_HASH, tokens[:16])
    assert hashes[1] == hash_block(hashes[0], tokens[16:32])
    # Same second block after a different first block: a different hash.
    other = block_hashes([7] * 16 + tokens[16:32], 16)
    assert other[1] != hashes[1]
    # Pinned value: the hash must be identical in every process and on every machine.
    assert hash_block(ROOT_HASH, [1, 2, 3]) == hash_block(0, (1, 2, 3))
    assert hash_block(ROOT_HASH, [1, 2, 3]) == 0xEB57CDA0323EEEE1


def test_allocate_takes_lru_head_and_free_appends_tail():
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert [b.block_id for b in a] == [0, 1]
    assert pool.num_free_blocks == 2
    pool.free(reversed(a))
    assert list(pool._free) == [2, 3, 1, 0]
    b = pool.allocate(3)
    assert [x.block_id for x in b] == [2, 3, 1]
    pool.check_consistency([b])
    with pytest.raises(RuntimeError):
        pool.allocate(2)


def test_cache_hit_requires_equal_tokens_and_eviction_emits_events():
    pool = BlockPool(2)
    (blk,) = pool.allocate(1)
    pool.cache(blk, 123, (1, 2))
    assert pool.lookup(123, (1, 2)) is blk
    assert pool.lookup(123, (1, 3)) is None  # a hash collision never serves other tokens
    pool.free([blk])
    assert pool.lookup(123, (1, 2)) is blk  # free but still cached
    pool.touch([blk])
    assert blk.ref_count == 1 and pool.num_free_blocks == 1
    pool.free([blk])
    # Allocating the whole pool evicts the cached block.
    pool.allocate(2)
    assert pool.lookup(123, (1, 2)) is None
    events = pool.drain_events()
    assert events.stored == [] and events.evicted == [123]  # netted: its last event wins
    assert pool.stats.num_evicted_blocks == 1
    assert not pool.drain_events()


def test_events_are_netted_to_each_hash_latest_state():
    pool = BlockPool(1)
    (blk,) = pool.allocate(1)
    pool.cache(blk, 7, (1,))
    pool.free([blk])
    (blk,) = pool.allocate(1)  # evicts 7
    pool.cache(blk, 7, (1,))  # stored again: the router must end up believing it is held
    events = pool.drain_events()
    assert events.stored == [7] and events.evicted == []


def test_unreported_events_merge_with_newer_ones():
    from distserve.engine.block_pool import BlockEvents

    lost = BlockEvents(stored=[1, 2], evicted=[3])  # a heartbeat that never arrived
    newer = BlockEvents(stored=[3], evicted=[1])
    merged = lost.then(newer)
    assert sorted(merged.stored) == [2, 3] and merged.evicted == [1]
    assert not BlockEvents() and BlockEvents().then(BlockEvents()) == BlockEvents()


def test_first_writer_wins_for_duplicate_hashes():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache(a, 9, (1,))
    pool.cache(b, 9, (1,))
    assert pool.lookup(9, (1,)) is a
    assert b.block_hash is None
    pool.free([b])
    pool.allocate(2)  # reuses b and the blank block; a keeps its hash
    assert pool.lookup(9, (1,)) is a


def test_consistency_check_catches_wrong_refcount():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.check_consistency([[a]])
    with pytest.raises(AssertionError):
        pool.check_consistency([[a], [a]])
