"""How the driver runs a step on all ranks of its instance.

    UniprocExecutor      TP=1: the driver's own worker.
    SpawnedTPExecutor    TP>1 in one machine (offline ``LLM``): the driver spawns ranks 1..TP-1,
                         forms a gloo (CPU) or NCCL (GPU) group with them, and broadcasts each
                         step's inputs; every rank runs the model, only the driver samples.

The cluster launcher has its own ranks (started by torchrun) and uses the same ``worker_loop``.
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

from distserve.engine.step_inputs import StepInputs
from distserve.engine.worker import Worker, WorkerSpec, broadcast_step, worker_loop
from distserve.model.parallel import TensorParallelGroup

logger = logging.getLogger(__name__)


class Executor(ABC):
    worker: Worker  # the driver's own rank

    @abstractmethod
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run one step on every rank; returns the driver's logits."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop any ranks this executor started."""


class UniprocExecutor(Executor):
    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = Worker(spec)

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        return self.worker.execute(inputs)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _rank_main(rank: int, world_size: int, init_method: str, spec: WorkerSpec) -> None:
    if spec.device.startswith("cuda"):
        spec = WorkerSpec(**{**spec.__dict__, "device": f"cuda:{rank}"})
    dist.init_process_group(
        _backend_for(spec.device),
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


class SpawnedTPExecutor(Executor):
    def __init__(self, spec: WorkerSpec, tp_size: int) -> None:
        assert tp_size > 1
        if dist.is_initialized():
            raise RuntimeError(
                "SpawnedTPExecutor needs a process without a torch.distributed world"
            )
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self._procs = [
            ctx.Process(target=_rank_main, args=(r, tp_size, init_method, spec), daemon=True)
            for r in range(1, tp_size)
        ]
        for p in self._procs:
            p.start()
        self._closed = False
        try:
            dist.init_process_group(
                _backend_for(spec.device),
                init_method=init_method,
                rank=0,
                world_size=tp_size,
                timeout=timedelta(minutes=30),
            )
            self.worker = Worker(spec, TensorParallelGroup(0, tp_size, dist.group.WORLD))
        except BaseException:
            self._kill()
            raise

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        broadcast_step(inputs, src=0, group=dist.group.WORLD)
        return self.worker.execute(inputs)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            broadcast_step(None, src=0, group=dist.group.WORLD)
            for p in self._procs:
                p.join(timeout=30)
        finally:
            self._kill()
            if dist.is_initialized():
                dist.destroy_process_group()

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def cpu_threads_per_rank(tp_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // tp_size)
