"""How the driver runs a command on every rank of its instance.

    UniprocExecutor   TP=PP=1: the driver's own worker.
    GroupExecutor     TP·PP>1: broadcast each RankCommand to the instance's process group, run
                      the driver's share, gather the ranks' transfer results when asked. The group
                      is either made here by spawning ranks (offline ``LLM``,
                      :func:`spawn_group`) or given by the launcher (ranks started by torchrun).

Only the driver samples; every rank runs the model (TP all-reduces need them all, pipeline
stages pass activations along; see ``worker.py``). An instance's ranks are listed by
``pp_rank * tp_size + tp_rank``; :func:`new_stage_groups` and :func:`rank_parallel_groups` turn
that list into this rank's TP and pipeline handles.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from distserve.engine.worker import (
    RankCommand,
    Worker,
    WorkerSpec,
    broadcast_command,
    gather_results,
    wait_ranks_ready,
    worker_loop,
)
from distserve.model.parallel import (
    PipelineParallelGroup,
    TensorParallelGroup,
    instance_rank_layout,
    pipeline_group_for,
)

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
        pp: PipelineParallelGroup | None = None,
        group: dist.ProcessGroup | None = None,  # the instance's group; default: the TP group's
    ) -> None:
        self.worker = Worker(spec, tp, pp)
        self._group = group if group is not None else tp.group
        self._src = src_global_rank
        self._on_shutdown = on_shutdown
        self._closed = False
        wait_ranks_ready(self._src, self._group)

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


def new_stage_groups(
    instance_ranks: Sequence[int],
    tp_size: int,
    pp_size: int,
    instance_group: dist.ProcessGroup | None,
) -> list[dist.ProcessGroup | None]:
    """The TP group of each pipeline stage of one instance (index = pp_rank).

    ``dist.new_group`` is collective over the whole world: every rank must call this for every
    instance, in the same order, whether or not it belongs to the instance. With PP=1 the stage's
    TP group is the instance's group; with TP=1 there is none (no collective to run).
    """
    if tp_size == 1:
        return [None] * pp_size
    if pp_size == 1:
        return [instance_group]
    ranks = list(instance_ranks)
    return [dist.new_group(ranks[s * tp_size : (s + 1) * tp_size]) for s in range(pp_size)]


def rank_parallel_groups(
    instance_ranks: Sequence[int],
    tp_size: int,
    pp_size: int,
    global_rank: int,
    instance_group: dist.ProcessGroup | None,
    stage_groups: Sequence[dist.ProcessGroup | None],
) -> tuple[TensorParallelGroup, PipelineParallelGroup]:
    """``global_rank``'s TP handle (its stage's group) and pipeline handle (the instance's)."""
    pp_rank, tp_rank = instance_rank_layout(instance_ranks, tp_size, pp_size, global_rank)
    tp = TensorParallelGroup(tp_rank, tp_size, stage_groups[pp_rank])
    pp = pipeline_group_for(instance_ranks, tp_size, pp_size, global_rank, instance_group)
    return tp, pp


def _rank_main(rank: int, tp_size: int, pp_size: int, init_method: str, spec: WorkerSpec) -> None:
    world_size = tp_size * pp_size
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
        ranks = list(range(world_size))
        stage_groups = new_stage_groups(ranks, tp_size, pp_size, dist.group.WORLD)
        tp, pp = rank_parallel_groups(ranks, tp_size, pp_size, rank, dist.group.WORLD, stage_groups)
        worker = Worker(spec, tp, pp)
        worker_loop(worker, src=0, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def spawn_group(spec: WorkerSpec, tp_size: int, pp_size: int = 1) -> GroupExecutor:
    """Offline TP/PP: spawn ranks 1..tp·pp-1 in child processes; this process is rank 0 (the
    driver: stage 0, TP rank 0). Global rank = pp_rank * tp_size + tp_rank."""
    world_size = tp_size * pp_size
    assert world_size > 1
    if dist.is_initialized():
        raise RuntimeError(
            "tensor_parallel_size or pipeline_parallel_size > 1 offline needs a process without "
            "a torch.distributed world"
        )
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(r, tp_size, pp_size, init_method, spec), daemon=True)
        for r in range(1, world_size)
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
            world_size=world_size,
            timeout=timedelta(minutes=30),
        )
        ranks = list(range(world_size))
        stage_groups = new_stage_groups(ranks, tp_size, pp_size, dist.group.WORLD)
        tp, pp = rank_parallel_groups(ranks, tp_size, pp_size, 0, dist.group.WORLD, stage_groups)
        return GroupExecutor(spec, tp, 0, on_shutdown=stop, pp=pp, group=dist.group.WORLD)
    except BaseException:
        for p in procs:
            p.kill()
            p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise


def cpu_threads_per_rank(num_ranks: int) -> int:
    return max(1, (os.cpu_count() or 1) // num_ranks)
