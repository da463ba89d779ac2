"""Per-request KV blocks on top of the block pool: prefix hits, slot allocation, freeing.

Owns each request's block list (its block table) and the bookkeeping of which of its full
blocks are registered in the prefix cache. It never touches tensors.

    request blocks:  [ b0 | b1 | b2 | b3 ]
                       cached ... | computed, not yet cached (partial) | room for new tokens
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from distserve.engine.block_hash import ROOT_HASH, hash_block
from distserve.engine.block_pool import Block, BlockEvents, BlockPool
from distserve.engine.request import Request


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks: dict[str, list[Block]] = {}
        self._num_cached_blocks: dict[
            str, int
        ] = {}  # leading blocks already registered in the cache

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def blocks(self, request_id: str) -> list[Block]:
        return self._blocks.get(request_id, [])

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_block_hashes(self, request: Request) -> None:
        """Extend ``request.block_hashes`` to cover every full block of its known tokens."""
        num_full = request.num_tokens // self.block_size
        hashes = request.block_hashes
        while len(hashes) < num_full:
            start = len(hashes) * self.block_size
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(hash_block(parent, request.token_slice(start, start + self.block_size)))

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """The longest run of leading blocks of ``request`` present in the prefix cache.

        At least one token is always left to compute, so the step that finishes the prompt
        has logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            start = i * self.block_size
            block = self.pool.lookup(
                block_hash, tuple(request.token_slice(start, start + self.block_size))
            )
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(
        self, request: Request, num_new_tokens: int, cached: Sequence[Block] = ()
    ) -> bool:
        held = len(self._blocks.get(request.request_id, ())) + len(cached)
        need = self.num_blocks_needed(request.num_computed_tokens + num_new_tokens) - held
        # Cache hits sitting in the free queue stop being free once touched.
        free_hits = sum(1 for b in cached if b.ref_count == 0)
        return need <= self.pool.num_free_blocks - free_hits

    # ---- mutations -----------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, cached: Sequence[Block] = ()) -> bool:
        """Give ``request`` room for ``num_new_tokens`` more tokens (after taking ``cached``).

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        if not self.can_allocate(request, num_new_tokens, cached):
            return False
        blocks = self._blocks.setdefault(request.request_id, [])
        if cached:
            assert not blocks, "cache hits are only taken at admission"
            self.pool.touch(cached)
            blocks.extend(cached)
            self._num_cached_blocks[request.request_id] = len(cached)
        need = self.num_blocks_needed(request.num_computed_tokens + num_new_tokens) - len(blocks)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's newly completed full blocks in the prefix cache.

        Called after a step ran, so only blocks whose KV is really in the cache are shared.
        """
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        num_full = request.num_computed_tokens // self.block_size
        done = self._num_cached_blocks.get(rid, 0)
        if num_full <= done:
            return
        self.update_block_hashes(request)
        blocks = self._blocks[rid]
        for i in range(done, num_full):
            start = i * self.block_size
            tokens = tuple(request.token_slice(start, start + self.block_size))
            self.pool.cache(blocks[i], request.block_hashes[i], tokens)
        self._num_cached_blocks[rid] = num_full

    def free(self, request_id: str) -> None:
        """Release every block of the request (last block first, see BlockPool.free)."""
        blocks = self._blocks.pop(request_id, None)
        self._num_cached_blocks.pop(request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def record_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.pool.record_lookup(num_queried_tokens, num_hit_tokens)

    def drain_events(self) -> BlockEvents:
        return self.pool.drain_events()

    def check_consistency(self, extra_holders: Iterable[list[Block]] = ()) -> None:
        self.pool.check_consistency([*self._blocks.values(), *extra_holders])
