"""Paged attention with PyTorch ``scaled_dot_product_attention``; runs on CPU and GPU.

A step's sequences are split into two kinds when the plan is built (once per step, from the
host-side lists in the metadata, so there is no device→host sync):

* **decode** (one new token each): the sequences are cut into groups of similar length (each
  sequence needs at least ``_MIN_GROUP_FILL`` of its group's longest one's blocks); per group one
  ``index_select`` gathers their blocks into a padded ``[B, kv_heads, num_keys, head_dim]`` batch
  and one SDPA call attends, with a key-padding mask only when their lengths differ. Grouping
  keeps the padding gathered and attended small when lengths are mixed (one group gathering every
  sequence to the longest one read about twice the real KV at batch 32). The gather writes into a
  buffer the backend keeps across layers and steps (one layer's largest group): on CPU a fresh
  tensor of tens of MB page-faults on first touch, which cost more than the copy itself. The
  query heads sharing a KV head are laid out as that head's query rows
  (``[B, kv_heads, group, head_dim]``), which handles GQA/MQA without copying K/V and measured
  fastest on CPU.
* **prefill** (several new tokens): one SDPA per sequence. A first chunk attends to its own fresh
  keys with ``is_causal``; a later chunk gathers its cached context and uses a causal mask
  shifted by the number of cached tokens.

Padded key slots (past a sequence's length) are masked out, but their bytes still enter the
matmul, so the engine must allocate the cache with finite values (``torch.zeros``), never with
``torch.empty``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distserve.model.attention.base import AttentionBackend, write_kv
from distserve.model.attention_metadata import AttentionMetadata

# A decode group's sequences each need at least this share of its longest sequence's blocks, so
# padding is under a quarter of what a group gathers; each group costs one gather + SDPA a layer.
_MIN_GROUP_FILL = 0.75


@dataclass
class _DecodeGroup:
    rows: torch.Tensor | None  # flat-batch rows of this group's tokens; None: all rows, in order
    block_ids: torch.Tensor  # [num_seqs * num_blocks] cache blocks to gather, sequence-major
    num_keys: int  # keys attended per sequence: the longest sequence's length
    key_mask: torch.Tensor | None  # bool [num_seqs, 1, 1, num_keys]: True = real token;
    # None when every sequence of the group has num_keys tokens


@dataclass
class _PrefillSeq:
    token_start: int  # first row of this sequence in the flat batch
    num_tokens: int  # new tokens of this sequence in this step
    seq_len: int  # context length after this step
    block_ids: torch.Tensor | None  # blocks holding the context; None: nothing was cached before
    mask: torch.Tensor | None  # bool [num_tokens, seq_len] shifted-causal mask; None: is_causal


@dataclass
class _SdpaPlan:
    attn: AttentionMetadata
    decodes: list[_DecodeGroup]
    prefills: list[_PrefillSeq]


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        return True

    def __init__(self) -> None:
        self._gather_buffer = torch.empty(0)  # decode gathers land here; grows, never shrinks

    def prepare(self, attn: AttentionMetadata) -> _SdpaPlan:
        starts = [0]
        for n in attn.query_lens_cpu:
            starts.append(starts[-1] + n)
        decode_ids = [i for i, n in enumerate(attn.query_lens_cpu) if n == 1]
        prefills = [
            self._plan_prefill(attn, i, starts[i])
            for i, n in enumerate(attn.query_lens_cpu)
            if n > 1
        ]
        decodes = [
            self._plan_decode(attn, group, starts)
            for group in _group_by_length(decode_ids, attn.seq_lens_cpu, attn.block_size)
        ]
        return _SdpaPlan(attn, decodes, prefills)

    @staticmethod
    def _plan_decode(
        attn: AttentionMetadata, seq_ids: list[int], starts: list[int]
    ) -> _DecodeGroup:
        device = attn.block_tables.device
        lens = [attn.seq_lens_cpu[i] for i in seq_ids]
        num_keys = max(lens)
        if len(seq_ids) == attn.num_seqs:
            rows, block_tables, seq_lens = None, attn.block_tables, attn.seq_lens
        else:
            rows = torch.tensor([starts[i] for i in seq_ids], device=device)
            index = torch.tensor(seq_ids, device=device)
            block_tables, seq_lens = attn.block_tables[index], attn.seq_lens[index]
        key_mask = None
        if min(lens) < num_keys:
            key_pos = torch.arange(num_keys, device=device)
            key_mask = (key_pos[None, :] < seq_lens[:, None])[:, None, None, :]
        block_ids = block_tables[:, : -(-num_keys // attn.block_size)].reshape(-1)
        return _DecodeGroup(rows, block_ids, num_keys, key_mask)

    @staticmethod
    def _plan_prefill(attn: AttentionMetadata, i: int, token_start: int) -> _PrefillSeq:
        num_tokens, seq_len = attn.query_lens_cpu[i], attn.seq_lens_cpu[i]
        num_cached = seq_len - num_tokens
        if num_cached == 0:
            return _PrefillSeq(token_start, num_tokens, seq_len, None, None)
        device = attn.block_tables.device
        block_ids = attn.block_tables[i, : -(-seq_len // attn.block_size)]
        key_pos = torch.arange(seq_len, device=device)
        query_pos = torch.arange(num_cached, seq_len, device=device)
        mask = key_pos[None, :] <= query_pos[:, None]
        return _PrefillSeq(token_start, num_tokens, seq_len, block_ids, mask)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache_layer: torch.Tensor,
        plan: _SdpaPlan,
        scale: float,
    ) -> torch.Tensor:
        write_kv(kv_cache_layer, key, value, plan.attn.slot_mapping)
        decodes = plan.decodes
        if len(decodes) == 1 and decodes[0].rows is None:
            return self._decode(query, kv_cache_layer, decodes[0], scale)
        out = torch.empty_like(query)
        for group in decodes:
            assert group.rows is not None
            decoded = self._decode(query.index_select(0, group.rows), kv_cache_layer, group, scale)
            out.index_copy_(0, group.rows, decoded)
        for seq in plan.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.num_tokens)
            out[rows] = _prefill(query[rows], key[rows], value[rows], kv_cache_layer, seq, scale)
        return out

    def _decode(
        self, query: torch.Tensor, kv_cache_layer: torch.Tensor, group: _DecodeGroup, scale: float
    ) -> torch.Tensor:
        """One new token per sequence: ``query [B, heads, head_dim]`` → same shape."""
        num_seqs, num_heads, head_dim = query.shape
        _, _, block_size, num_kv_heads, _ = kv_cache_layer.shape
        gathered = self._gather_out(
            (2, group.block_ids.numel(), block_size, num_kv_heads, head_dim), kv_cache_layer
        )
        kv = torch.index_select(kv_cache_layer, 1, group.block_ids, out=gathered)
        kv = kv.view(2, num_seqs, -1, num_kv_heads, head_dim)[:, :, : group.num_keys]
        kv = kv.transpose(2, 3).to(query.dtype)
        grouped_query = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(
            grouped_query, kv[0], kv[1], attn_mask=group.key_mask, scale=scale
        )
        return out.reshape(num_seqs, num_heads, head_dim)

    def _gather_out(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A ``shape`` view of the gather buffer, reallocated when too small for it."""
        numel = math.prod(shape)
        buffer = self._gather_buffer
        if buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._gather_buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


def _group_by_length(seq_ids: list[int], seq_lens: list[int], block_size: int) -> list[list[int]]:
    """Split decode sequences into groups of similar block counts, each in batch order."""
    groups: list[list[int]] = []
    longest = 0  # blocks of the current group's longest sequence
    for i in sorted(seq_ids, key=lambda i: -seq_lens[i]):
        num_blocks = -(-seq_lens[i] // block_size)
        if groups and num_blocks >= longest * _MIN_GROUP_FILL:
            groups[-1].append(i)
        else:
            groups.append([i])
            longest = num_blocks
    return [sorted(group) for group in groups]


def _prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    seq: _PrefillSeq,
    scale: float,
) -> torch.Tensor:
    """Several new tokens of one sequence: ``query [n, heads, head_dim]`` → same shape.

    As in decode, the query heads sharing a KV head are one batch row (``[kv_heads, group, n,
    head_dim]``) and that head's keys/values are broadcast over the group (``expand``, no copy).
    ``enable_gqa=True`` would give the same result, but on CPU it falls back to the math kernel,
    which materialises the ``[heads, n, seq_len]`` scores (measured 2.6x slower at n = 512).
    """
    num_tokens, num_heads, head_dim = query.shape
    if seq.block_ids is None:
        keys, values = key.transpose(0, 1), value.transpose(0, 1)
    else:
        kv = kv_cache_layer.index_select(1, seq.block_ids)
        kv = kv.view(2, -1, *key.shape[1:])[:, : seq.seq_len].transpose(1, 2)
        keys, values = kv[0].to(query.dtype), kv[1].to(query.dtype)
    num_kv_heads, num_keys = keys.shape[:2]
    group = num_heads // num_kv_heads
    grouped_query = query.view(num_tokens, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    shape = (num_kv_heads, group, num_keys, head_dim)
    out = F.scaled_dot_product_attention(
        grouped_query,
        keys[:, None].expand(shape),
        values[:, None].expand(shape),
        attn_mask=seq.mask,
        is_causal=seq.mask is None,
        scale=scale,
    )
    return out.permute(2, 0, 1, 3).reshape(num_tokens, num_heads, head_dim)
