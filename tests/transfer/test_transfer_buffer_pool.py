"""The host message pool: size classes, reuse of released buffers, and its idle cap."""

from __future__ import annotations

import torch

from distserve.transfer.buffer_pool import MessagePool, size_class

CPU = torch.device("cpu")


def test_size_classes_waste_at_most_a_quarter() -> None:
    assert [size_class(n) for n in (1, 4096, 4097, 8192, 8193, 12289)] == [
        4096,
        4096,
        5120,
        8192,
        10240,
        14336,
    ]
    for num_bytes in range(4097, 300_000, 997):
        assert num_bytes <= size_class(num_bytes) < 1.25 * num_bytes + 1


def test_released_buffers_are_lent_again_as_exact_views() -> None:
    pool = MessagePool(max_pooled_bytes=1 << 20)
    first = pool.acquire(5000, CPU, is_pinned=False)
    assert first.numel() == 5000 and first.dtype == torch.uint8 and first.is_contiguous()
    address = first.data_ptr()
    pool.release(first)
    assert (pool.num_lent, pool.num_pooled_bytes) == (0, 5120)
    second = pool.acquire(4500, CPU, is_pinned=False)  # same size class
    assert second.numel() == 4500 and second.data_ptr() == address
    other = pool.acquire(9000, CPU, is_pinned=False)  # another class: fresh memory
    assert other.data_ptr() != address and pool.num_lent == 2


def test_cap_bounds_idle_memory_and_foreign_buffers_are_ignored() -> None:
    pool = MessagePool(max_pooled_bytes=8_000)
    a, b = pool.acquire(5000, CPU, False), pool.acquire(5000, CPU, False)
    pool.release(a)
    pool.release(b)  # over the cap: dropped, not kept
    assert pool.num_pooled_bytes == 5120 and pool.num_lent == 0
    pool.release(torch.empty(10, dtype=torch.uint8))
    assert pool.num_pooled_bytes == 5120
