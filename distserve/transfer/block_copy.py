"""Gathering a request's blocks out of a paged KV cache, and scattering them back in.

Owns the two copies at either end of a message. Both touch dim 2 (blocks) of the cache layout
``(num_layers, 2, num_blocks, block_size, num_local_kv_heads, head_dim)`` with one indexed copy,
and restrict dim 4 (heads) to the slice a peer owns. Neither allocates: the caller hands in the
contiguous output (a message's payload view) or input.
"""

from __future__ import annotations

import torch

_BLOCK_DIM = 2
_HEAD_DIM = 4


def _heads(cache: torch.Tensor, heads: slice) -> torch.Tensor:
    if heads.start == 0 and heads.stop == cache.shape[_HEAD_DIM]:
        return cache
    return cache[:, :, :, :, heads]


def block_index(block_ids: list[int], device: torch.device) -> torch.Tensor:
    """Block ids as the int64 index tensor both copies take."""
    return torch.tensor(block_ids, dtype=torch.int64).to(device, non_blocking=True)


def gather_blocks(
    cache: torch.Tensor, index: torch.Tensor, heads: slice, out: torch.Tensor
) -> None:
    """``out[:, :, i] = cache[:, :, index[i], :, heads]`` as one ``index_select``."""
    torch.index_select(_heads(cache, heads), _BLOCK_DIM, index, out=out)


def scatter_blocks(
    cache: torch.Tensor, index: torch.Tensor, heads: slice, src: torch.Tensor
) -> None:
    """``cache[:, :, index[i], :, heads] = src[:, :, i]`` as one ``index_copy_``."""
    _heads(cache, heads).index_copy_(_BLOCK_DIM, index, src)
