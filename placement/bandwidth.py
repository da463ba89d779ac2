"""Point-to-point bandwidth between two ranks, as KV transfer sees it.

Owns one measurement: a torch.distributed world of two processes (gloo on CPU, each pinned to
its own core; NCCL between two GPUs), rank 0 sends a buffer of S bytes and rank 1 answers with
one byte; bandwidth = S / round-trip time, the median of a few repeats per size, the largest
size reported. It does not know about KV layouts (``distserve.transfer``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distserve.engine.executor import free_port


@dataclass(frozen=True)
class BandwidthResult:
    bytes_per_s: float  # at the largest size
    per_size: dict[int, float]  # size (bytes) -> median bytes/s
    backend: str
    cores: tuple[int, ...] | None


def _rank_main(
    rank: int, init: str, backend: str, core: int | None, sizes: list[int], repeats: int, out: Any
) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    try:
        ack = torch.zeros(1, dtype=torch.uint8, device=device)
        results = {}
        for size in sizes:
            buf = torch.zeros(size, dtype=torch.uint8, device=device)
            times = []
            for i in range(repeats + 1):  # the first round warms the connection up
                dist.barrier()
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(ack, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(ack, 0)
                if backend == "nccl":
                    torch.cuda.synchronize(device)
                if i:
                    times.append(time.perf_counter() - t0)
            results[size] = size / statistics.median(times)
        if rank == 0:
            out.put(results)
    finally:
        dist.destroy_process_group()


def measure_p2p_bandwidth(
    device: str = "cpu",
    cores: tuple[int, int] | None = None,
    sizes_bytes: tuple[int, ...] = (1 << 20, 1 << 22, 1 << 24, 1 << 26),
    repeats: int = 5,
    timeout_s: float = 300.0,
) -> BandwidthResult:
    """Bandwidth between two processes (two pinned cores on CPU, GPUs 0 and 1 on CUDA)."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < 2:
        raise ValueError("measuring NCCL bandwidth needs two GPUs")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, init, backend, cores[r] if cores else None, list(sizes_bytes), repeats, out),
            daemon=True,
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        per_size = out.get(timeout=timeout_s)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    largest = max(per_size)
    return BandwidthResult(per_size[largest], per_size, backend, cores)
