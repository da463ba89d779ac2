"""Gathering a request's blocks out of a paged KV cache, and scattering them back in.

Owns the two copies at either end of a message. Both index dim 2 (blocks) of the cache layout
``(num_layers, 2, num_blocks, block_size, num_local_kv_heads, head_dim)`` with one indexed copy,
restricted to the heads a peer owns on dim 4. Neither allocates: the caller hands in the
contiguous output (a message's payload view) or input.

Both copies move whole rows (a block's keys or values of one layer; with a head slice, one
token's heads), so they reinterpret each row as 8-byte words when its size and alignment allow:
the element type is irrelevant to a copy, and ``index_copy_`` on CPU runs up to twice as fast on
8-byte elements as on 2-byte ones.
"""

from __future__ import annotations

import torch

_BLOCK_DIM = 2
_HEAD_DIM = 4


def _merged_rows(kv: torch.Tensor, is_all_heads: bool) -> torch.Tensor:
    """``kv`` (…, blocks, block_size, heads, head_dim) with its contiguous trailing dims merged."""
    return kv.flatten(3) if is_all_heads else kv.flatten(4)


def _as_words(rows: torch.Tensor) -> torch.Tensor | None:
    if rows.shape[-1] * rows.element_size() % 8:
        return None
    try:
        return rows.view(torch.int64)
    except RuntimeError:  # strides or storage offset not word-aligned
        return None


def _row_views(
    cache: torch.Tensor, heads: slice, blocks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching row views of the cache (restricted to ``heads``) and of a contiguous blocks tensor."""
    is_all_heads = heads.start == 0 and heads.stop == cache.shape[_HEAD_DIM]
    cache_rows = _merged_rows(cache if is_all_heads else cache[:, :, :, :, heads], is_all_heads)
    block_rows = _merged_rows(blocks, is_all_heads)
    cache_words, block_words = _as_words(cache_rows), _as_words(block_rows)
    if cache_words is None or block_words is None:
        return cache_rows, block_rows
    return cache_words, block_words


def block_index(block_ids: list[int], device: torch.device) -> torch.Tensor:
    """Block ids as the int64 index tensor both copies take."""
    return torch.tensor(block_ids, dtype=torch.int64).to(device, non_blocking=True)


def gather_blocks(
    cache: torch.Tensor, index: torch.Tensor, heads: slice, out: torch.Tensor
) -> None:
    """``out[:, :, i] = cache[:, :, index[i], :, heads]`` as one ``index_select``."""
    cache_rows, out_rows = _row_views(cache, heads, out)
    torch.index_select(cache_rows, _BLOCK_DIM, index, out=out_rows)


def scatter_blocks(
    cache: torch.Tensor, index: torch.Tensor, heads: slice, src: torch.Tensor
) -> None:
    """``cache[:, :, index[i], :, heads] = src[:, :, i]`` as one ``index_copy_``."""
    cache_rows, src_rows = _row_views(cache, heads, src)
    cache_rows.index_copy_(_BLOCK_DIM, index, src_rows)
