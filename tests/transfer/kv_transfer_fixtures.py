"""Deterministic caches and requests that every rank of a test (or one process) rebuilds alike."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from distserve.engine.kv_spec import KVCacheSpec
from distserve.transfer.descriptor import TransferDescriptor
from distserve.transfer.wire import torch_dtype


@dataclass(frozen=True)
class Pull:
    transfer_id: str
    src_block_ids: list[int]  # in the prefill caches
    dst_block_ids: list[int]  # in the decode caches


def model_cache(spec: KVCacheSpec, num_blocks: int, seed: int) -> torch.Tensor:
    """A cache holding every KV head (what TP=1 would hold)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return torch.randn(shape, generator=gen).to(torch_dtype(spec))


def rank_cache(full: torch.Tensor, spec: KVCacheSpec, tp_rank: int, tp_size: int) -> torch.Tensor:
    start, end = spec.kv_head_range(tp_rank, tp_size)
    return full[:, :, :, :, start:end].contiguous()


def make_pulls(
    block_counts: list[int], num_src_blocks: int, num_dst_blocks: int, seed: int
) -> list[Pull]:
    """Pulls with shuffled, non-contiguous, pairwise disjoint block ids on both sides."""
    rng = random.Random(seed)
    src_free = rng.sample(range(num_src_blocks), sum(block_counts))
    dst_free = rng.sample(range(num_dst_blocks), sum(block_counts))
    pulls = []
    for i, count in enumerate(block_counts):
        pulls.append(Pull(f"req-{i}", src_free[:count], dst_free[:count]))
        src_free, dst_free = src_free[count:], dst_free[count:]
    return pulls


def descriptor(
    spec: KVCacheSpec,
    pull: Pull,
    seq_no: int,
    src_ranks: tuple[int, ...],
    dst_ranks: tuple[int, ...],
) -> TransferDescriptor:
    return TransferDescriptor(
        pull.transfer_id, seq_no, len(pull.src_block_ids), src_ranks, dst_ranks, spec
    )


def expected_dst_cache(
    initial_dst: torch.Tensor,
    full_src: torch.Tensor,
    spec: KVCacheSpec,
    pulls: list[Pull],
    dst_tp_rank: int,
    dst_tp: int,
) -> torch.Tensor:
    """The decode rank's cache after ``pulls`` landed: their blocks replaced, others untouched."""
    start, end = spec.kv_head_range(dst_tp_rank, dst_tp)
    expected = initial_dst.clone()
    for pull in pulls:
        expected[:, :, pull.dst_block_ids] = full_src[:, :, pull.src_block_ids, :, start:end]
    return expected
