"""How the driver runs a command on every rank of its instance.

    UniprocExecutor   TP=1: the driver's own worker.
    GroupExecutor     TP>1: broadcast each RankCommand to the instance's process group, run the
                      driver's share, gather the ranks' transfer results when asked. The group is
                      either made here by spawning ranks (offline ``LLM``, :func:`spawn_tp_group`)
                      or given by the launcher (ranks started by torchrun).

Only the driver samples; every rank runs the model (TP all-reduces need them all).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
from abc import ABC, abstractmethod
from datetime import timedelta

import torch
import torch.distributed as dist

from distserve.engine.worker import (
    RankCommand,
    Worker,
    WorkerSpec,
    broadcast_command,
    gather_results,
    worker_loop,
)
from distserve.model.parallel import TensorParallelGroup

logger = logging.getLogger(__name__)


class Executor(ABC):
    worker: Worker  # the driver's own rank

    @abstractmethod
    def run(self, cmd: RankCommand) -> tuple[torch.Tensor | None, list[list]]:
        """Run one command everywhere: the driver's logits and each rank's transfer results."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop any ranks this executor started."""


class UniprocExecutor(Executor):
    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = Worker(spec)

    def run(self, cmd: RankCommand) -> tuple[torch.Tensor | None, list[list]]:
        logits, results = self.worker.run(cmd)
        return logits, [results]


class GroupExecutor(Executor):
    def __init__(
        self,
        spec: WorkerSpec,
        tp: TensorParallelGroup,
        src_global_rank: int,
        on_shutdown: object | None = None,
    ) -> None:
        self.worker = Worker(spec, tp)
        self._group = tp.group
        self._src = src_global_rank
        self._on_shutdown = on_shutdown
        self._closed = False

    def run(self, cmd: RankCommand) -> tuple[torch.Tensor | None, list[list]]:
        broadcast_command(cmd, self._src, self._group)
        logits, results = self.worker.run(cmd)
        if cmd.gather_transfers:
            return logits, gather_results(results, self._src, self._group, is_driver=True)
        return logits, [results]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            broadcast_command(None, self._src, self._group)
        finally:
            if callable(self._on_shutdown):
                self._on_shutdown()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _rank_main(rank: int, world_size: int, init_method: str, spec: WorkerSpec) -> None:
    if spec.device.startswith("cuda"):
        spec = WorkerSpec(**{**spec.__dict__, "device": f"cuda:{rank}"})
    dist.init_process_group(
        dist_backend_for(spec.device),
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=30),
    )
    try:
        worker = Worker(spec, TensorParallelGroup(rank, world_size, dist.group.WORLD))
        worker_loop(worker, src=0, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def spawn_tp_group(spec: WorkerSpec, tp_size: int) -> GroupExecutor:
    """Offline TP: spawn ranks 1..tp-1 in child processes, this process is rank 0 (the driver)."""
    assert tp_size > 1
    if dist.is_initialized():
        raise RuntimeError(
            "tensor_parallel_size > 1 offline needs a process without a torch.distributed world"
        )
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(r, tp_size, init_method, spec), daemon=True)
        for r in range(1, tp_size)
    ]
    for p in procs:
        p.start()

    def stop() -> None:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()

    try:
        dist.init_process_group(
            dist_backend_for(spec.device),
            init_method=init_method,
            rank=0,
            world_size=tp_size,
            timeout=timedelta(minutes=30),
        )
        return GroupExecutor(
            spec, TensorParallelGroup(0, tp_size, dist.group.WORLD), 0, on_shutdown=stop
        )
    except BaseException:
        for p in procs:
            p.kill()
        raise


def cpu_threads_per_rank(tp_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // tp_size)
