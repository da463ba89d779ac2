"""The interface every attention backend implements, and the paged-cache write they share.

A backend is built once per model and shared by all layers. Each step the model calls
:meth:`AttentionBackend.prepare` once with the step's :class:`AttentionMetadata`, and passes the
returned plan to every layer's :meth:`AttentionBackend.forward`, so per-step index tensors and
masks are built once rather than once per layer.

Per layer the backend receives this rank's slice of the cache::

    kv_cache_layer.shape == (2, num_blocks, block_size, num_local_kv_heads, head_dim)
                             ^ 0 = keys, 1 = values

and must (1) write the step's new keys/values at ``attn.slot_mapping`` and (2) attend each new
query causally to its own sequence's context, read through ``attn.block_tables``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from distserve.model.attention_metadata import AttentionMetadata


class AttentionBackend(ABC):
    name: ClassVar[str]  # registry key, e.g. "sdpa"

    @classmethod
    @abstractmethod
    def is_available(cls, device: torch.device) -> bool:
        """Whether this backend can run on ``device`` in this environment."""

    def prepare(self, attn: AttentionMetadata) -> Any:
        """Build whatever the layers of this step share; returned as ``plan`` to :meth:`forward`."""
        return attn

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [T, num_local_heads, head_dim], rotary already applied
        key: torch.Tensor,  # [T, num_local_kv_heads, head_dim], rotary already applied
        value: torch.Tensor,  # [T, num_local_kv_heads, head_dim]
        kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_local_kv_heads, head_dim]
        plan: Any,  # what prepare() returned for this step
        scale: float,  # softmax scale, usually head_dim ** -0.5
    ) -> torch.Tensor:
        """Attention output ``[T, num_local_heads, head_dim]`` in ``query.dtype``."""


def write_kv(
    kv_cache_layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each new token's key and value at its flat slot ``block_id * block_size + offset``."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache_layer.shape
    slots = kv_cache_layer.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    slots[0].index_copy_(0, slot_mapping, key.to(kv_cache_layer.dtype))
    slots[1].index_copy_(0, slot_mapping, value.to(kv_cache_layer.dtype))
