"""Tensor- and pipeline-parallel handles, and the communication the model and worker need.

Owns: which rank of how many this process is inside one instance's TP group, how a dimension is
split across ranks, and all-reduce / all-gather over ``torch.distributed``; which pipeline stage
this rank is, which decoder layers the stage holds (:func:`stage_layer_range`) and the
point-to-point send/receive of hidden states between stages. Does not own process group creation
(the executor and the launcher do that) nor KV head placement (``KVCacheSpec.kv_head_range``).

A rank of an instance is ``(pp_rank, tp_rank)``; its index in the instance's rank list is
``pp_rank * tp_size + tp_rank`` (a stage's TP ranks are contiguous).

A group of size 1 never touches ``torch.distributed``: every collective is the identity, so a
single-process engine needs no initialised process group.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def stage_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """The ``[start, end)`` decoder layers of stage ``pp_rank`` of ``pp_size``.

    An even split; the remainder goes to the first stages, one layer each (10 layers over 4
    stages: 3, 3, 2, 2). The first stages also run the embedding lookup while the last runs the
    final norm and the LM head, so neither end is obviously the lighter one; the rule is simply
    fixed and documented so that every rank (and KV transfer, later) computes the same ranges.
    """
    check_pipeline_parallel_size(num_layers, pp_size)
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"invalid pipeline-parallel rank {pp_rank} of size {pp_size}")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def check_pipeline_parallel_size(num_layers: int, pp_size: int) -> None:
    """Raise ``ValueError`` unless every one of ``pp_size`` stages gets at least one layer."""
    if not isinstance(pp_size, int) or pp_size < 1:
        raise ValueError(f"pipeline_parallel_size must be >= 1, got {pp_size!r}")
    if pp_size > num_layers:
        raise ValueError(
            f"pipeline_parallel_size={pp_size} exceeds the model's {num_layers} decoder layers "
            "(every stage needs at least one layer)"
        )


@dataclass(frozen=True)
class PipelineParallelGroup:
    """This rank's pipeline stage and the peers it exchanges activations with.

    Peers are global ranks of ``torch.distributed`` on ``group`` (the instance's group): TP rank
    ``r`` of stage ``s`` receives from TP rank ``r`` of stage ``s - 1`` and sends to TP rank ``r``
    of stage ``s + 1``. ``driver`` is the instance's driver (stage 0, TP rank 0) and
    ``logits_src`` the rank that sends it the logits (last stage, TP rank 0).
    """

    rank: int = 0  # this stage, 0 <= rank < size
    size: int = 1  # number of stages
    prev_peer: int | None = None  # global rank to receive hidden states from (None: first stage)
    next_peer: int | None = None  # global rank to send hidden states to (None: last stage)
    driver: int = 0
    logits_src: int = 0
    group: ProcessGroup | None = None  # torch.distributed group holding every peer

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"invalid pipeline-parallel rank {self.rank} of size {self.size}")

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        return stage_layer_range(num_layers, self.size, self.rank)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        import torch.distributed as dist

        dist.send(tensor.contiguous(), dst=dst, group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Fill the preallocated ``tensor`` from global rank ``src`` and return it."""
        import torch.distributed as dist

        dist.recv(tensor, src=src, group=self.group)
        return tensor


def instance_rank_layout(
    instance_ranks: Sequence[int], tp_size: int, pp_size: int, global_rank: int
) -> tuple[int, int]:
    """``(pp_rank, tp_rank)`` of ``global_rank`` in an instance whose ranks are listed by
    ``pp_rank * tp_size + tp_rank``."""
    if len(instance_ranks) != tp_size * pp_size:
        raise ValueError(
            f"an instance of TP={tp_size} x PP={pp_size} needs {tp_size * pp_size} ranks, "
            f"got {len(instance_ranks)}"
        )
    return divmod(list(instance_ranks).index(global_rank), tp_size)


def pipeline_group_for(
    instance_ranks: Sequence[int],
    tp_size: int,
    pp_size: int,
    global_rank: int,
    group: ProcessGroup | None,
) -> PipelineParallelGroup:
    """The pipeline handle of ``global_rank`` inside an instance laid out by (pp, tp)."""
    ranks = list(instance_ranks)
    pp_rank, tp_rank = instance_rank_layout(ranks, tp_size, pp_size, global_rank)
    return PipelineParallelGroup(
        rank=pp_rank,
        size=pp_size,
        prev_peer=ranks[(pp_rank - 1) * tp_size + tp_rank] if pp_rank > 0 else None,
        next_peer=ranks[(pp_rank + 1) * tp_size + tp_rank] if pp_rank < pp_size - 1 else None,
        driver=ranks[0],
        logits_src=ranks[(pp_size - 1) * tp_size],
        group=group,
    )
