"""Reuse of host message buffers between transfers.

Owns :class:`MessagePool`. A fresh large host allocation is mapped lazily, so the first write
into it (the gather, or the kernel copying a received message in) pays a page fault per 4 KiB
page — on the test machine that tripled the cost of a gather. Keeping released buffers and
handing them out again removes that. Buffers are binned by size class (powers of two split in
four steps, so at most 25% is wasted) and lent as a prefix view of the exact message size.
Device buffers (the nccl path) are left to PyTorch's caching allocator and are not pooled.

A buffer goes back to the pool only when nothing can still touch it: its op completed (or
failed) and, on the receiver, its payload has been scattered.
"""

from __future__ import annotations

import torch

DEFAULT_MAX_POOLED_BYTES = 512 << 20


def size_class(num_bytes: int) -> int:
    """The smallest 2^k · {1, 1.25, 1.5, 1.75} that holds ``num_bytes`` (at least 4 KiB)."""
    if num_bytes <= 4096:
        return 4096
    top = 1 << (num_bytes - 1).bit_length()  # smallest power of two >= num_bytes
    step = top // 8  # the four classes above top / 2
    return -(-num_bytes // step) * step


class MessagePool:
    """Free host buffers by (size class, pinned), up to ``max_pooled_bytes`` kept idle."""

    def __init__(self, max_pooled_bytes: int = DEFAULT_MAX_POOLED_BYTES) -> None:
        self._max_pooled_bytes = max_pooled_bytes
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr of a lent view -> its whole buffer
        self.num_pooled_bytes = 0

    def acquire(self, num_bytes: int, device: torch.device, is_pinned: bool) -> torch.Tensor:
        """An uninitialized contiguous uint8 buffer of exactly ``num_bytes`` on ``device``."""
        if device.type != "cpu":
            return torch.empty(num_bytes, dtype=torch.uint8, device=device)
        capacity = size_class(num_bytes)
        free = self._free.get((capacity, is_pinned))
        if free:
            whole = free.pop()
            self.num_pooled_bytes -= capacity
        else:
            whole = torch.empty(capacity, dtype=torch.uint8, pin_memory=is_pinned)
        view = whole[:num_bytes]
        self._lent[view.data_ptr()] = whole
        return view

    def release(self, buffer: torch.Tensor) -> None:
        """Take back a buffer from :meth:`acquire`; the caller must not touch it again."""
        whole = self._lent.pop(buffer.data_ptr(), None)
        if whole is None:  # a device buffer, or not from this pool
            return
        if self.num_pooled_bytes + whole.numel() > self._max_pooled_bytes:
            return  # let it go back to the allocator
        self._free.setdefault((whole.numel(), whole.is_pinned()), []).append(whole)
        self.num_pooled_bytes += whole.numel()

    @property
    def num_lent(self) -> int:
        return len(self._lent)
