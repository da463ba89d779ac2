"""The typed records that cross the transfer boundary: what to move, and how it went.

Owns :class:`TransferDescriptor` (built by the decode driver, carried to every rank of both
instances over the control channel), :class:`TransferResult` (what ``poll()`` hands back),
:class:`TransferState` and :class:`SeqNoAllocator`. Nothing here touches tensors or
torch.distributed.

``seq_no`` is the ordering contract. Between one prefill instance and one decode instance the
decode driver numbers its pulls 0, 1, 2, … without gaps, in the order its ranks post the
receives. Every (prefill rank, decode rank) pair of that link carries the transfers in that
order: receivers post in ``seq_no`` order and senders issue strictly in ``seq_no`` order. With
pipeline parallelism each stage is its own link (its own ranks, its own spec with the stage's
``num_layers``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from distserve.engine.kv_spec import KVCacheSpec
from distserve.transfer.plan import HeadSlice, plan_head_slices


class TransferState(enum.Enum):
    """Where one transfer is on one rank. The last three are terminal and reported by poll()."""

    QUEUED = "queued"  # sender: waiting for its gather or for earlier seq_nos on a pair
    POSTED = "posted"  # receiver: receives posted, not all messages arrived yet
    IN_FLIGHT = "in_flight"  # sender: every isend issued, not all complete
    COMMITTING = "committing"  # receiver: all arrived, scatter into the cache still running
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED, TransferState.CANCELLED)


@dataclass(frozen=True)
class TransferDescriptor:
    """One request's KV pull from a prefill instance into a decode instance."""

    transfer_id: str  # unique id, agreed on the control channel before any bytes move
    seq_no: int  # position among this decode instance's pulls from this prefill instance: 0, 1, …
    num_blocks: int  # KV blocks in the request (same count on both sides)
    src_ranks: tuple[int, ...]  # global ranks of the prefill instance, indexed by its tp rank
    dst_ranks: tuple[int, ...]  # global ranks of the decode instance, indexed by its tp rank
    spec: KVCacheSpec  # layout both instances registered with (model-wide, before TP split)

    def __post_init__(self) -> None:
        if not self.transfer_id:
            raise ValueError("transfer_id must be a non-empty string")
        if self.seq_no < 0:
            raise ValueError(f"seq_no must be >= 0, got {self.seq_no}")
        if self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        object.__setattr__(self, "src_ranks", tuple(self.src_ranks))
        object.__setattr__(self, "dst_ranks", tuple(self.dst_ranks))
        ranks = self.src_ranks + self.dst_ranks
        if not self.src_ranks or not self.dst_ranks or len(set(ranks)) != len(ranks):
            raise ValueError(
                f"src_ranks {self.src_ranks} and dst_ranks {self.dst_ranks} must be non-empty "
                "and name distinct ranks"
            )
        plan_head_slices(self.spec, self.src_tp, self.dst_tp)  # raises on an impossible split

    @property
    def src_tp(self) -> int:
        return len(self.src_ranks)

    @property
    def dst_tp(self) -> int:
        return len(self.dst_ranks)

    def head_slices(self) -> tuple[HeadSlice, ...]:
        return plan_head_slices(self.spec, self.src_tp, self.dst_tp)

    def to_dict(self) -> dict[str, Any]:
        """Plain fields for the control channel (the proto writer maps them one to one)."""
        return {
            "transfer_id": self.transfer_id,
            "seq_no": self.seq_no,
            "num_blocks": self.num_blocks,
            "src_ranks": list(self.src_ranks),
            "dst_ranks": list(self.dst_ranks),
            "spec": self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> TransferDescriptor:
        return cls(
            transfer_id=fields["transfer_id"],
            seq_no=fields["seq_no"],
            num_blocks=fields["num_blocks"],
            src_ranks=tuple(fields["src_ranks"]),
            dst_ranks=tuple(fields["dst_ranks"]),
            spec=KVCacheSpec(**fields["spec"]),
        )


@dataclass(frozen=True)
class TransferResult:
    """How one transfer ended on one rank; the instance's driver combines its ranks' results."""

    transfer_id: str  # the descriptor's id
    state: TransferState  # DONE, FAILED or CANCELLED
    num_bytes: int  # KV payload bytes this rank moved for the transfer (message headers excluded)
    elapsed_s: float  # from start_send/post_recv on this rank to the result
    error: str | None = None  # why it failed or was cancelled; None when DONE

    @property
    def is_ok(self) -> bool:
        return self.state is TransferState.DONE

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.num_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0


class SeqNoAllocator:
    """The decode driver's counter: the next ``seq_no`` for a pull from a prefill instance."""

    def __init__(self) -> None:
        self._next: dict[tuple[int, ...], int] = {}

    def next_seq_no(self, src_ranks: tuple[int, ...]) -> int:
        seq_no = self._next.get(tuple(src_ranks), 0)
        self._next[tuple(src_ranks)] = seq_no + 1
        return seq_no
