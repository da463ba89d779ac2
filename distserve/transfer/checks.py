"""Argument checks shared by the sender and the receiver.

Owns input validation only: a caller's mistake (wrong rank, block ids, cache layout) becomes a
``ValueError`` that says what was expected, before any state changes or any op is posted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distserve.engine.kv_spec import KVCacheSpec
from distserve.transfer.wire import torch_dtype


def check_cache(cache: torch.Tensor, spec: KVCacheSpec, tp_size: int) -> None:
    expected = (
        spec.num_layers,
        2,
        cache.shape[2] if cache.dim() == 6 else -1,
        spec.block_size,
        spec.num_local_kv_heads(tp_size),
        spec.head_dim,
    )
    if tuple(cache.shape) != expected or cache.dtype != torch_dtype(spec):
        raise ValueError(
            f"KV cache {tuple(cache.shape)} {cache.dtype} does not match the transfer's layout "
            f"{expected} {torch_dtype(spec)} at TP={tp_size}"
        )
    if not cache.is_contiguous():
        raise ValueError("the KV cache tensor must be contiguous")


def check_block_ids(block_ids: Sequence[int], num_blocks: int, cache: torch.Tensor) -> list[int]:
    ids = [int(b) for b in block_ids]
    if len(ids) != num_blocks:
        raise ValueError(f"expected {num_blocks} block ids, got {len(ids)}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"block ids must be distinct, got {ids}")
    if any(not 0 <= b < cache.shape[2] for b in ids):
        raise ValueError(f"block ids {ids} out of range for a cache of {cache.shape[2]} blocks")
    return ids


def check_member(rank: int, ranks: tuple[int, ...], side: str, transfer_id: str) -> int:
    """This rank's tp rank within ``ranks``."""
    if rank not in ranks:
        raise ValueError(
            f"rank {rank} is not one of the {side} ranks {ranks} of transfer {transfer_id!r}"
        )
    return ranks.index(rank)
