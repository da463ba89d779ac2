"""Run a function on every rank of a fresh gloo world on 127.0.0.1, with a hard deadline.

Each rank is a spawned process with one intra-op thread (the test machine has 2 cores). The
parent always ends the world: on success, on a rank's exception (its traceback is re-raised
here) and on the deadline (every rank still alive is killed). Each rank destroys its process
groups on the way out, whatever happened.
"""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distserve.transfer.descriptor import TransferResult

Worker = Callable[[int, int, Any], None]  # (rank, world_size, scenario)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, world_size: int, port: int, worker: Worker, scenario: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        worker(rank, world_size, scenario)
    finally:
        dist.destroy_process_group()


def run_gloo_world(worker: Worker, world_size: int, scenario: Any, timeout_s: float = 45.0) -> None:
    """Run ``worker(rank, world_size, scenario)`` on every rank; raise if any rank fails."""
    context = mp.start_processes(
        _rank_main,
        args=(world_size, _free_port(), worker, scenario),
        nprocs=world_size,
        join=False,
        daemon=True,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.05, deadline - time.monotonic()), grace_period=2.0):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"gloo world of {world_size} ranks still running after {timeout_s} s"
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        for process in context.processes:
            process.join(timeout=5.0)


def poll_until(endpoint: Any, num_results: int, timeout_s: float = 20.0) -> list[TransferResult]:
    """Poll a KVSender/KVReceiver like an engine loop until ``num_results`` results came back
    and no orphaned op is left."""
    results: list[TransferResult] = []
    deadline = time.monotonic() + timeout_s
    while len(results) < num_results or endpoint.num_orphans:
        results += endpoint.poll()
        endpoint.check_consistency()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(results)}/{num_results} results after {timeout_s} s: {results}"
            )
        time.sleep(0.001)
    assert len(results) == num_results, results
    return results
