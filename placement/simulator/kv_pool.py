"""The simulated KV pool of one instance: capacity in blocks, a prefix cache, LRU eviction.

Owns block accounting only (no token contents): blocks in use by requests, cached blocks that
requests share by chained hash, and unreferenced cached blocks kept in LRU order until space is
needed. Reports which hashes it stored and evicted, which the simulator forwards to the routing
policy as instance events. It does not own scheduling.

    capacity = | in use: cached & referenced | in use: private | cached, unreferenced (LRU) | free |
               |   (shared prefix blocks)    | (being computed, |  evicted oldest first      |      |
               |                             |  tails, outputs) |                            |      |
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class KVPool:
    """Blocks of one instance; prefix caching optional."""

    def __init__(self, capacity_blocks: int, enable_prefix_caching: bool) -> None:
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced
        self._refs: dict[int, int] = {}  # cached, referenced: hash -> references
        self.num_private = 0
        self.evicted: list[int] = []  # drained by the simulator after each call
        self.stored: list[int] = []

    @property
    def num_free(self) -> int:
        """Blocks allocatable now, counting unreferenced cached blocks as free (evictable)."""
        return self.capacity_blocks - len(self._refs) - self.num_private

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` present in the cache."""
        if not self.enable_prefix_caching:
            return 0
        n = 0
        for h in hashes:
            if h not in self._refs and h not in self._lru:
                break
            n += 1
        return n

    def allocate(self, hashes: Sequence[int], num_cached: int, num_private: int) -> bool:
        """Reference the first ``num_cached`` hashes (cached) and take ``num_private`` new blocks;
        evicts LRU blocks as needed. False (and no change) when it cannot fit."""
        refs = self._refs
        if not num_cached:
            if num_private > self.capacity_blocks - len(refs) - self.num_private:
                return False
            self.num_private += num_private
            self._evict_to_fit()
            return True
        newly_referenced = sum(1 for h in hashes[:num_cached] if h not in refs)
        if newly_referenced + num_private > self.num_free:
            return False
        lru = self._lru
        for h in hashes[:num_cached]:
            if h in lru:
                del lru[h]
            refs[h] = refs.get(h, 0) + 1
        self.num_private += num_private
        self._evict_to_fit()
        return True

    def commit(self, hashes: Sequence[int]) -> None:
        """Computed blocks become cached (still referenced): one private block per hash is
        turned into a shared one; a hash already cached frees the duplicate. Without prefix
        caching they stay private until ``release``."""
        if not self.enable_prefix_caching:
            return
        self.num_private -= len(hashes)
        assert self.num_private >= 0, "committed more blocks than were private"
        lru, refs, stored = self._lru, self._refs, self.stored
        for h in hashes:
            n = refs.get(h)
            if n is not None:
                refs[h] = n + 1
                continue
            if h in lru:
                del lru[h]
            else:
                stored.append(h)
            refs[h] = 1

    def release(self, cached_hashes: Sequence[int], num_private: int) -> None:
        """Drop a request's references; unreferenced blocks join the LRU list, leaf first so
        that a prefix outlives its extensions. ``cached_hashes`` are the blocks the request
        referenced or committed; without prefix caching those are private blocks, freed here."""
        if not self.enable_prefix_caching:
            num_private += len(cached_hashes)
            cached_hashes = ()
        self.num_private -= num_private
        assert self.num_private >= 0, "released more private blocks than allocated"
        lru, refs = self._lru, self._refs
        for h in reversed(cached_hashes):
            n = refs[h] - 1
            if n:
                refs[h] = n
            else:
                del refs[h]
                lru[h] = None
        self._evict_to_fit()

    def _evict_to_fit(self) -> None:
        lru = self._lru
        excess = len(lru) + len(self._refs) + self.num_private - self.capacity_blocks
        if excess > 0 and lru:
            evicted = self.evicted
            for _ in range(min(excess, len(lru))):
                evicted.append(lru.popitem(last=False)[0])

    def check_consistency(self) -> None:
        assert not set(self._lru) & set(self._refs), "a block is both referenced and in the LRU"
        assert all(r > 0 for r in self._refs.values())
        assert self.num_private >= 0
        assert len(self._lru) + len(self._refs) + self.num_private <= self.capacity_blocks
