"""Chained block hashes: the one function that names a block of prompt tokens.

The router's prefix index and every instance's prefix cache key blocks with this function, so a
prefix the router believes an instance holds is exactly the prefix that instance would reuse.

    tokens:  | t0 .. t15 | t16 .. t31 | t32 .. t40 (partial, never hashed)
    hashes:  |    h0     |    h1      |
             h0 = H(ROOT, t0..t15);  h1 = H(h0, t16..t31)

Each full block's hash covers its own tokens and its parent's hash, so equal hashes mean equal
prefixes (up to a 64-bit collision, which the prefix cache guards against by also comparing the
stored tokens). The hash is blake2b over fixed-width little-endian integers: it is the same in
every process, on every machine and Python version, unlike the built-in ``hash``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0
"""The parent hash of a sequence's first block."""


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash one full block of tokens chained onto its parent's hash (a 64-bit unsigned int)."""
    payload = struct.pack(f"<Q{len(token_ids)}q", parent_hash, *token_ids)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def block_hashes(
    token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH
) -> list[int]:
    """Hashes of every *full* block of ``token_ids``; a trailing partial block is not hashed."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size])
        hashes.append(parent_hash)
    return hashes
