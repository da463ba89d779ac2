"""How one (transfer, rank pair) is cut into chunks that travel as separate, in-order messages.

Owns the pure mapping (number of blocks, bytes per block on the pair, chunk size) -> chunk
spans. It does not move bytes. Both ends compute the same plan from the descriptor and their
own ``chunk_bytes`` (so both must be configured alike, as they are by default; the header's
``chunk_index``/``num_chunks`` catch a mismatch that the message sizes alone would not).

Why chunks: a transfer is three copies in a row — gather (index_select into a message), wire
(isend/irecv), scatter (index_copy_ into the cache). Cut into chunks they form a pipeline, and
the gather of chunk k+1 and the scatter of chunk k-1 run while chunk k is on the wire (and a
chunk is still in cache when the next copy reads it)::

    gather  | c0 | c1 | c2 | c3 |
    wire         | c0 | c1 | c2 | c3 |
    scatter           | c0 | c1 | c2 | c3 |

A chunk is a run of consecutive entries of the transfer's block list (all layers, K and V, the
pair's heads), so gather and scatter keep their one-indexed-copy form. Blocks are spread evenly:
the plan uses the fewest chunks of at most ``chunk_bytes`` (at least one block each) and chunk
sizes differ by at most one block, so there is no tiny last chunk. A transfer that fits in one
chunk is exactly the unchunked message.

The 4 MB default: on the 2-core test machine 1 MB chunks were clearly slower (per-message
thread hand-offs), 2, 4 and 8 MB indistinguishable within its noise; 4 MB keeps the number of
messages per GB low while a chunk still fits in the last-level cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

DEFAULT_CHUNK_BYTES = 4 << 20  # see benchmarks/kv_transfer.py --compare 0,1,2,8


@dataclass(frozen=True)
class ChunkSpan:
    """One chunk of a (transfer, rank pair): which entries of the transfer's block list it holds."""

    index: int  # position among the pair's chunks: 0, 1, …; also the order they are sent in
    num_chunks: int  # chunks in the pair's plan
    first_block: int  # index into the transfer's block id list
    num_blocks: int  # consecutive block-list entries from first_block

    @property
    def blocks(self) -> slice:
        return slice(self.first_block, self.first_block + self.num_blocks)


def check_chunk_bytes(chunk_bytes: int) -> int:
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return chunk_bytes


@functools.lru_cache(maxsize=256)
def plan_chunks(num_blocks: int, block_bytes: int, chunk_bytes: int) -> tuple[ChunkSpan, ...]:
    """Chunks for ``num_blocks`` blocks of ``block_bytes`` each on one pair (cached per size)."""
    assert num_blocks > 0 and block_bytes > 0 and chunk_bytes > 0
    max_blocks_per_chunk = max(1, chunk_bytes // block_bytes)
    num_chunks = -(-num_blocks // max_blocks_per_chunk)
    bounds = [i * num_blocks // num_chunks for i in range(num_chunks + 1)]
    return tuple(
        ChunkSpan(i, num_chunks, bounds[i], bounds[i + 1] - bounds[i]) for i in range(num_chunks)
    )
