"""The pool of KV blocks of one instance, and the prefix cache that lives in it.

Owns block ids, reference counts, the free queue and the hash → block map. It does not know
about requests (that is :mod:`distserve.engine.kv_manager`) nor about tensors (block ``i`` is
simply index ``i`` on dim 2 of every rank's cache tensor).

    block states:   in use (ref_count > 0)          free (ref_count == 0, in the free queue)
                    ├─ cached: holds a full block   ├─ cached: reusable until evicted
                    └─ uncached: partial/new block  └─ uncached: blank

The free queue is in least-recently-used order: ``free`` appends at the tail, ``allocate``
takes from the head and evicts the block's hash if it had one. A cache hit on a free block
takes it out of the queue. A cached block is identified by its chained hash *and* its tokens,
so a 64-bit collision can never serve another prefix's KV.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set while the block is in the prefix cache
    token_ids: tuple[int, ...] | None = None  # the block's tokens, compared on every hit


@dataclass
class PrefixCacheStats:
    num_queried_tokens: int = 0  # prompt tokens looked up at admission
    num_hit_tokens: int = 0  # of those, served from the cache
    num_evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


@dataclass
class BlockEvents:
    """Hashes stored in / evicted from the prefix cache since the last drain (for the router).

    Netted: a hash appears in at most one list, the one of its latest event (stored then evicted
    is evicted; evicted then stored again is stored), so the order a reader applies the two lists
    in does not matter.
    """

    stored: list[int] = field(default_factory=list)
    evicted: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stored or self.evicted)

    def then(self, newer: BlockEvents) -> BlockEvents:
        """These events followed by ``newer``, netted (for a report that must be re-sent)."""
        state = dict.fromkeys(self.stored, True) | dict.fromkeys(self.evicted, False)
        state.update(dict.fromkeys(newer.stored, True))
        state.update(dict.fromkeys(newer.evicted, False))
        return _events_from_state(state)


def _events_from_state(state: dict[int, bool]) -> BlockEvents:
    return BlockEvents(
        stored=[h for h, stored in state.items() if stored],
        evicted=[h for h, stored in state.items() if not stored],
    )


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, Block] = {}
        self.stats = PrefixCacheStats()
        self._events: dict[int, bool] = {}  # hash -> stored (True) / evicted (False), latest wins

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, num_blocks: int) -> list[Block]:
        """Take ``num_blocks`` blocks from the head of the free queue, evicting their hashes."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks with {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_count = 1
            out.append(block)
        return out

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> Block | None:
        """The cached block holding exactly these tokens after this chained hash, if any."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on cache hits (removing free ones from the free queue)."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference on each block; blocks reaching zero join the free queue's tail.

        Callers pass a request's blocks last-first, so the tail of a prompt is evicted before
        its head, which more requests are likely to share.
        """
        for block in blocks:
            assert block.ref_count > 0, f"double free of block {block.block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = None

    def cache(self, block: Block, block_hash: int, token_ids: tuple[int, ...]) -> None:
        """Register a full, computed block under its chained hash (first writer wins)."""
        if not self.enable_prefix_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # another block already holds this prefix; this one stays private
        block.block_hash = block_hash
        block.token_ids = token_ids
        self._cached[block_hash] = block
        self._events[block_hash] = True

    def record_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.stats.num_queried_tokens += num_queried_tokens
        self.stats.num_hit_tokens += num_hit_tokens

    def drain_events(self) -> BlockEvents:
        events, self._events = self._events, {}
        return _events_from_state(events)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash of free blocks (used when weights change or by tests)."""
        for block_id in self._free:
            self._evict(self.blocks[block_id])

    def _evict(self, block: Block) -> None:
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
            self._events[block.block_hash] = False
            self.stats.num_evicted_blocks += 1
        block.block_hash = None
        block.token_ids = None

    def check_consistency(self, held: Sequence[Sequence[Block]] | None = None) -> None:
        """Assert the pool's invariants; ``held`` (if given) lists every holder's blocks."""
        if held is not None:
            refs = [0] * self.num_blocks
            for blocks in held:
                for block in blocks:
                    refs[block.block_id] += 1
            for block in self.blocks:
                assert block.ref_count == refs[block.block_id], (
                    f"block {block.block_id}: ref_count {block.ref_count} != {refs[block.block_id]} holders"
                )
        for block in self.blocks:
            assert block.ref_count >= 0
            assert (block.ref_count == 0) == (block.block_id in self._free), (
                f"block {block.block_id}: ref_count {block.ref_count}, in free queue: {block.block_id in self._free}"
            )
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash and block.token_ids is not None
