"""``distserve launch --config cluster.yaml``: what every rank runs under torchrun.

    torchrun --nproc-per-node 3 -m distserve.cli launch --config configs/cpu-2p1d.yaml

Each rank reads the same YAML, finds its instance (ranks are assigned prefill, decode, colocated
in order), pins itself to its cores, joins the world (gloo on CPU; gloo+NCCL on GPU) and makes
the groups of every instance: the instance's group (commands, transfer results, pipeline
hand-offs) and, with PP > 1 and TP > 1, one TP group per stage. A rank of an instance is
(pp_rank, tp_rank), at index ``pp_rank * tp + tp_rank`` of its ranks; torchrun's
``--nproc-per-node`` is the sum of ``tp * pp`` over all instances. An instance's first rank is its
driver: it builds the engine, serves gRPC and registers with the router. The other ranks run the
model steps their driver broadcasts. Environment read here (and only here): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT (set by torchrun), DISTSERVE_HOST (the address this node's instances advertise).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from distserve.launch.cluster_config import (
    ClusterConfig,
    ConfigError,
    InstancePlan,
    load_cluster_config,
)

if TYPE_CHECKING:
    from distserve.model.parallel import PipelineParallelGroup, TensorParallelGroup

logger = logging.getLogger(__name__)

_NEVER = timedelta(days=365)  # idle worker ranks wait for their driver's next step indefinitely


@dataclasses.dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    world_id: str  # identifies this torch.distributed world (instances can only move KV inside one)
    advertise_host: str

    @classmethod
    def from_environ(cls, router_host: str) -> RankEnv:
        missing = [
            k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
        ]
        if missing:
            raise ConfigError(f"distserve launch runs under torchrun; {', '.join(missing)} not set")
        loopback = router_host in ("127.0.0.1", "localhost", "::1")
        return cls(
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_id=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            advertise_host=os.environ.get("DISTSERVE_HOST")
            or ("127.0.0.1" if loopback else os.uname().nodename),
        )


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="cluster YAML (see configs/)")
    parser.add_argument("--model", help="override the config's model path")
    parser.add_argument("--router", help="router gRPC address host:port (default: from the config)")


def run_launch(args: argparse.Namespace) -> int:
    config = load_cluster_config(args.config, model=args.model)
    env = RankEnv.from_environ(config.router.host)
    router = args.router or f"{config.router.host}:{config.router.grpc_port}"
    return launch_rank(config, env, router)


def _device(config: ClusterConfig, env: RankEnv, plan: InstancePlan) -> str:
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return "cpu"
    devices = plan.pool.devices
    index = devices[plan.index][plan.ranks.index(env.rank)] if devices else env.local_rank
    return f"cuda:{index}"


def launch_rank(config: ClusterConfig, env: RankEnv, router_address: str) -> int:
    if env.world_size != config.world_size:
        raise ConfigError(
            f"torchrun started {env.world_size} ranks but the config's instances need {config.world_size}"
        )
    plan = config.instance_for_rank(env.rank)
    cores = plan.cpu_cores()
    if cores:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(plan.pool.num_threads or len(cores))
    device = _device(config, env, plan)
    backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=_NEVER)
    try:
        from distserve.engine.executor import new_stage_groups, rank_parallel_groups

        # dist.new_group is collective: every rank makes every instance's groups, in one order.
        groups: dict[str, dist.ProcessGroup | None] = {}
        stage_groups: dict[str, list] = {}
        for p in config.instances():
            group = dist.new_group(list(p.ranks)) if len(p.ranks) > 1 else None
            groups[p.instance_id] = group
            stage_groups[p.instance_id] = new_stage_groups(p.ranks, p.pool.tp, p.pool.pp, group)
        group = groups[plan.instance_id]
        tp, pp = rank_parallel_groups(
            plan.ranks,
            plan.pool.tp,
            plan.pool.pp,
            env.rank,
            group,
            stage_groups[plan.instance_id],
        )
        if env.rank == plan.driver_rank:
            return _run_driver(config, env, plan, group, tp, pp, device, router_address)
        signal.signal(
            signal.SIGINT, signal.SIG_IGN
        )  # the driver stops us (Ctrl-C reaches every rank)
        _run_follower(env, plan, group, tp, pp, device)
        return 0
    finally:
        dist.destroy_process_group()


def _run_driver(
    config: ClusterConfig,
    env: RankEnv,
    plan: InstancePlan,
    group: dist.ProcessGroup | None,
    tp: TensorParallelGroup,
    pp: PipelineParallelGroup,
    device: str,
    router_address: str,
) -> int:
    from distserve.engine.executor import GroupExecutor, UniprocExecutor
    from distserve.engine.llm_engine import LLMEngine
    from distserve.engine.worker import WorkerSpec
    from distserve.instance.server import InstanceOptions, serve_instance

    moves_kv = plan.role != "colocated"

    def make_executor(spec: WorkerSpec) -> object:
        spec = dataclasses.replace(
            spec,
            device=device,
            transfer_backend=config.transfer.backend if moves_kv else None,
            global_rank=env.rank,
            transfer_timeout_s=config.transfer.timeout_s,
        )
        if len(plan.ranks) == 1:
            return UniprocExecutor(spec)
        dist.broadcast_object_list([spec], src=plan.driver_rank, group=group)
        return GroupExecutor(spec, tp, src_global_rank=plan.driver_rank, pp=pp, group=group)

    engine_config = dataclasses.replace(config.engine_config(plan.role), device=device)
    engine = LLMEngine(engine_config, role=plan.role, executor_factory=make_executor)
    options = InstanceOptions(
        instance_id=plan.instance_id,
        role=plan.role,
        ranks=plan.ranks,
        router_address=router_address,
        host=env.advertise_host,
        heartbeat_s=config.router.heartbeat_s,
        lease_timeout_s=config.kv_cache.lease_timeout_s,
        transfer_backend="nccl"
        if device.startswith("cuda") and config.transfer.backend != "gloo"
        else "gloo",
        world_id=env.world_id,
    )
    return asyncio.run(serve_instance(engine, options))


def _run_follower(
    env: RankEnv,
    plan: InstancePlan,
    group: dist.ProcessGroup | None,
    tp: TensorParallelGroup,
    pp: PipelineParallelGroup,
    device: str,
) -> None:
    from distserve.engine.worker import Worker, worker_loop

    box: list = [None]
    dist.broadcast_object_list(box, src=plan.driver_rank, group=group)
    spec = dataclasses.replace(box[0], global_rank=env.rank, device=device)
    worker = Worker(spec, tp, pp)
    worker_loop(worker, src=plan.driver_rank, group=group)
