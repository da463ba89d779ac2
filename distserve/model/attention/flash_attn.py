"""Paged attention with the ``flash_attn`` package (CUDA only).

One ``flash_attn_varlen_func`` call per layer covers the whole step, prefill and decode alike: the
queries are the flat batch (``cu_seqlens_q`` = ``attn.query_start_loc``), the keys/values are the
paged cache itself, addressed through ``block_table``. flash-attn aligns its causal mask to the
bottom-right, so a chunk's queries see the cached context before them. Requirements of flash-attn
itself: a version whose ``flash_attn_varlen_func`` accepts ``block_table`` (2.6+), fp16/bf16
tensors, and a cache ``block_size`` divisible by 256.

Not exercised by the CPU test suite; ``tests/model/test_flash_attn.py`` (marker ``gpu``) compares
it with the SDPA backend on a CUDA machine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distserve.model.attention.base import AttentionBackend, write_kv
from distserve.model.attention_metadata import AttentionMetadata


@dataclass
class _FlashPlan:
    attn: AttentionMetadata
    cu_seqlens_k: torch.Tensor  # int32 [B + 1]: prefix sums of seq_lens


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func

        self._varlen_func: Any = flash_attn_varlen_func

    def prepare(self, attn: AttentionMetadata) -> _FlashPlan:
        if attn.block_size % 256:
            raise ValueError(
                f"flash_attn needs a KV block_size divisible by 256, got {attn.block_size}"
            )
        cu_seqlens_k = F.pad(torch.cumsum(attn.seq_lens, dim=0, dtype=torch.int32), (1, 0))
        return _FlashPlan(attn, cu_seqlens_k)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache_layer: torch.Tensor,
        plan: _FlashPlan,
        scale: float,
    ) -> torch.Tensor:
        attn = plan.attn
        write_kv(kv_cache_layer, key, value, attn.slot_mapping)
        return self._varlen_func(
            query,
            kv_cache_layer[0],
            kv_cache_layer[1],
            cu_seqlens_q=attn.query_start_loc,
            cu_seqlens_k=plan.cu_seqlens_k,
            max_seqlen_q=attn.max_query_len,
            max_seqlen_k=attn.max_seq_len,
            softmax_scale=scale,
            causal=True,
            block_table=attn.block_tables,
        )
