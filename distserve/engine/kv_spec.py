"""The KV-cache layout contract shared by the model, the engine and KV transfer.

Each rank holds one tensor for the whole cache of its instance:

    kv_cache.shape == (num_layers, 2, num_blocks, block_size, num_local_kv_heads, head_dim)
                                   ^ 0 = keys, 1 = values

Token ``i`` of a request lives in block ``block_table[i // block_size]`` at offset
``i % block_size``; its flat *slot* is ``block_id * block_size + offset``. Gathering the blocks of
one request for transfer is a single ``index_select`` on dim 2.

Under tensor parallelism rank ``r`` of ``tp_size`` owns a contiguous range of KV heads
(:meth:`KVCacheSpec.kv_head_range`). When there are fewer KV heads than ranks (MQA/GQA with large
TP) heads are replicated: each rank owns exactly one head, shared with its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVCacheSpec:
    """What two instances must agree on before KV bytes can move between them."""

    num_layers: int
    num_kv_heads: int  # of the whole model, before any TP split
    head_dim: int
    block_size: int  # tokens per block
    dtype: str  # "float32" | "float16" | "bfloat16"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(
                f"unsupported KV dtype {self.dtype!r}; expected one of {sorted(_DTYPE_BYTES)}"
            )
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVCacheSpec.{name} must be positive, got {getattr(self, name)}")

    def kv_head_range(self, tp_rank: int, tp_size: int) -> tuple[int, int]:
        """The ``[start, end)`` global KV heads that rank ``tp_rank`` of ``tp_size`` holds."""
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
        if self.num_kv_heads >= tp_size:
            if self.num_kv_heads % tp_size:
                raise ValueError(f"{self.num_kv_heads} KV heads cannot be split over TP={tp_size}")
            per_rank = self.num_kv_heads // tp_size
            return tp_rank * per_rank, (tp_rank + 1) * per_rank
        if tp_size % self.num_kv_heads:
            raise ValueError(f"TP={tp_size} is not a multiple of the {self.num_kv_heads} KV heads")
        head = tp_rank * self.num_kv_heads // tp_size
        return head, head + 1

    def num_local_kv_heads(self, tp_size: int) -> int:
        start, end = self.kv_head_range(0, tp_size)
        return end - start

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    def block_bytes(self, tp_size: int = 1) -> int:
        """Bytes one block takes on one rank (keys and values of every layer)."""
        return (
            self.num_layers * 2 * self.block_size * self.num_local_kv_heads(tp_size) * self.head_dim
        ) * self.dtype_bytes

    def to_dict(self) -> dict[str, int | str]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "block_size": self.block_size,
            "dtype": self.dtype,
        }
