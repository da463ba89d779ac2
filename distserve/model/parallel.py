"""Tensor-parallel group handle and the two collectives the model layers need.

Owns: which rank of how many this process is inside one instance's TP group, how a dimension is
split across ranks, and all-reduce / all-gather over ``torch.distributed``. Does not own process
group creation (the launcher does that) nor KV head placement (``KVCacheSpec.kv_head_range``).

A group of size 1 never touches ``torch.distributed``: every collective is the identity, so a
single-process engine needs no initialised process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0  # this process's rank inside the group, 0 <= rank < size
    size: int = 1  # number of ranks that split each layer
    group: ProcessGroup | None = None  # torch.distributed group; None means the default world

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"invalid tensor-parallel rank {self.rank} of size {self.size}")

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    def split(self, total: int, what: str) -> tuple[int, int]:
        """The ``[start, end)`` slice of ``total`` items that this rank owns (even split required)."""
        if total % self.size:
            raise ValueError(f"{what}={total} is not divisible by tensor-parallel size {self.size}")
        per_rank = total // self.size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group in place and return it."""
        if self.is_parallel:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along the last dimension, in rank order."""
        if not self.is_parallel:
            return tensor
        import torch.distributed as dist

        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=-1)
