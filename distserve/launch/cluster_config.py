"""The cluster YAML: what runs where, validated before anything starts.

    model: /path/to/checkpoint          # required
    router:   {host, grpc_port, http_port, policy, ...}
    prefill:  {instances, tp, pp, max_num_batched_tokens, max_num_seqs, cpu_cores, ...}
    decode:   {...same keys...}
    colocated: {...same keys...}        # the baseline: both phases on one instance
    kv_cache: {block_size, cpu_memory_gib, gpu_memory_utilization, enable_prefix_caching, lease_timeout_s}
    transfer: {backend: auto|gloo|nccl, timeout_s}
    slo:      {ttft_s, tpot_s, attainment}

Ranks of the torch.distributed world are assigned in order: every prefill instance's ranks, then
decode, then colocated; an instance of ``tp`` x ``pp`` has ``tp * pp`` consecutive ranks listed by
``pp_rank * tp + tp_rank`` (a stage's TP ranks are contiguous) and its first rank, stage 0's TP
rank 0, is its driver. Pipeline parallelism (``pp > 1``) is accepted for colocated pools only. Unknown keys and impossible
values raise :class:`ConfigError` naming the key, e.g. ``prefill.tp: must be >= 1, got 0``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distserve.config import DTYPES, CacheConfig, EngineConfig, ParallelConfig
from distserve.engine.scheduler import SchedulerConfig

ROLES = ("prefill", "decode", "colocated")


class ConfigError(ValueError):
    """The cluster configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class RouterSection:
    host: str = "127.0.0.1"
    grpc_port: int = 50051  # 0 = any free port
    http_port: int | None = 8000  # None disables the OpenAI HTTP API
    policy: str = "round_robin"  # routing policy name (see distserve.router.policies)
    policy_options: dict[str, Any] = field(default_factory=dict)
    heartbeat_s: float = 0.5  # how often instances report load and cache events
    instance_timeout_s: float = 10.0  # an instance silent this long is considered dead
    model_name: str | None = None  # the name clients use; default: the model folder's name


@dataclass(frozen=True)
class PoolSection:
    instances: int = 0
    tp: int = 1
    pp: int = 1
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    admission: str = "fcfs"  # instance-side admission order (distserve.engine.admission)
    num_threads: int | None = None  # CPU threads per rank
    cpu_cores: list[list[int]] | None = None  # per instance: cores its ranks are pinned to (CPU)
    devices: list[list[int]] | None = None  # per instance: CUDA device per rank


@dataclass(frozen=True)
class KVCacheSection:
    block_size: int = 16
    num_blocks: int | None = None
    cpu_memory_gib: float = 1.0
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    lease_timeout_s: float = (
        30.0  # prefill holds a finished prefill's blocks this long for its pull
    )


@dataclass(frozen=True)
class TransferSection:
    backend: str = "auto"  # auto = nccl for CUDA caches, gloo otherwise
    timeout_s: float = 60.0


@dataclass(frozen=True)
class SLOSection:
    ttft_s: float | None = None
    tpot_s: float | None = None
    attainment: float = 0.9


@dataclass(frozen=True)
class InstancePlan:
    """One instance as the launcher starts it."""

    instance_id: str  # e.g. "prefill-0"
    role: str
    ranks: tuple[int, ...]  # global ranks, index pp_rank * tp + tp_rank
    pool: PoolSection
    index: int  # position within its role

    @property
    def driver_rank(self) -> int:
        return self.ranks[0]

    def cpu_cores(self) -> list[int] | None:
        cores = self.pool.cpu_cores
        return list(cores[self.index]) if cores else None


@dataclass(frozen=True)
class ClusterConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    router: RouterSection = field(default_factory=RouterSection)
    prefill: PoolSection = field(default_factory=PoolSection)
    decode: PoolSection = field(default_factory=PoolSection)
    colocated: PoolSection = field(default_factory=PoolSection)
    kv_cache: KVCacheSection = field(default_factory=KVCacheSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    slo: SLOSection = field(default_factory=SLOSection)

    # ---- derived -------------------------------------------------------------------------
    def pool(self, role: str) -> PoolSection:
        return getattr(self, role)

    def instances(self) -> list[InstancePlan]:
        plans, next_rank = [], 0
        for role in ROLES:
            pool = self.pool(role)
            for i in range(pool.instances):
                n = pool.tp * pool.pp
                plans.append(
                    InstancePlan(
                        f"{role}-{i}", role, tuple(range(next_rank, next_rank + n)), pool, i
                    )
                )
                next_rank += n
        return plans

    @property
    def world_size(self) -> int:
        return sum(len(p.ranks) for p in self.instances())

    def instance_for_rank(self, rank: int) -> InstancePlan:
        for plan in self.instances():
            if rank in plan.ranks:
                return plan
        raise ConfigError(f"rank {rank} is outside this cluster's world of {self.world_size} ranks")

    @property
    def model_name(self) -> str:
        return self.router.model_name or Path(self.model).name

    def engine_config(self, role: str) -> EngineConfig:
        pool, kv = self.pool(role), self.kv_cache
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_model_len,
            seed=self.seed,
            num_threads=pool.num_threads,
            cache=CacheConfig(
                block_size=kv.block_size,
                num_blocks=kv.num_blocks,
                cpu_memory_gib=kv.cpu_memory_gib,
                gpu_memory_utilization=kv.gpu_memory_utilization,
                enable_prefix_caching=kv.enable_prefix_caching,
            ),
            parallel=ParallelConfig(tensor_parallel_size=pool.tp, pipeline_parallel_size=pool.pp),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=pool.max_num_batched_tokens,
                max_num_seqs=pool.max_num_seqs,
                admission=pool.admission,
            ),
        )

    # ---- I/O -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> ClusterConfig:
        return cluster_config_from_dict({**self.to_dict(), **changes})


_SECTIONS = {
    "router": RouterSection,
    "prefill": PoolSection,
    "decode": PoolSection,
    "colocated": PoolSection,
    "kv_cache": KVCacheSection,
    "transfer": TransferSection,
    "slo": SLOSection,
}


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(names))})")
    return cls(**data)


def cluster_config_from_dict(data: dict[str, Any]) -> ClusterConfig:
    if not isinstance(data, dict):
        raise ConfigError("the cluster config must be a mapping")
    top = {f.name for f in dataclasses.fields(ClusterConfig)}
    for key in data:
        if key not in top:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(top))})")
    if not data.get("model"):
        raise ConfigError("model: required (path of a Hugging Face checkpoint folder)")
    kwargs = {k: v for k, v in data.items() if k not in _SECTIONS}
    for name, cls in _SECTIONS.items():
        kwargs[name] = _build(cls, data.get(name), name)
    config = ClusterConfig(**kwargs)
    validate(config)
    return config


def load_cluster_config(path: str | Path, **overrides: Any) -> ClusterConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"cluster config {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    data = dict(data or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "model" in data and not Path(str(data["model"])).is_absolute():
        candidate = (path.parent / str(data["model"])).resolve()
        if candidate.exists():
            data["model"] = str(candidate)
    return cluster_config_from_dict(data)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate(c: ClusterConfig) -> None:
    _check(c.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {c.dtype!r}")
    _check(
        c.device in ("auto", "cpu", "cuda"),
        "device",
        f"must be 'auto', 'cpu' or 'cuda', got {c.device!r}",
    )
    r = c.router
    for key in ("grpc_port", "http_port"):
        port = getattr(r, key)
        _check(
            port is None or (isinstance(port, int) and 0 <= port < 65536),
            f"router.{key}",
            f"not a port: {port!r}",
        )
    _check(r.heartbeat_s > 0, "router.heartbeat_s", f"must be > 0, got {r.heartbeat_s}")
    _check(
        r.instance_timeout_s > r.heartbeat_s,
        "router.instance_timeout_s",
        "must exceed router.heartbeat_s",
    )
    for role in ROLES:
        p = c.pool(role)
        _check(
            isinstance(p.instances, int) and p.instances >= 0,
            f"{role}.instances",
            f"must be >= 0, got {p.instances!r}",
        )
        _check(isinstance(p.tp, int) and p.tp >= 1, f"{role}.tp", f"must be >= 1, got {p.tp!r}")
        _check(isinstance(p.pp, int) and p.pp >= 1, f"{role}.pp", f"must be >= 1, got {p.pp!r}")
        _check(
            p.pp == 1 or role == "colocated",
            f"{role}.pp",
            f"got {p.pp}: pipeline parallelism is supported for colocated pools; KV transfer "
            "between pipeline stages is not implemented yet",
        )
        _check(p.max_num_batched_tokens >= 1, f"{role}.max_num_batched_tokens", "must be >= 1")
        _check(p.max_num_seqs >= 1, f"{role}.max_num_seqs", "must be >= 1")
        if p.cpu_cores is not None:
            _check(
                len(p.cpu_cores) == p.instances,
                f"{role}.cpu_cores",
                f"needs one core list per instance ({p.instances}), got {len(p.cpu_cores)}",
            )
    has_pd = c.prefill.instances > 0 or c.decode.instances > 0
    _check(
        (c.prefill.instances > 0) == (c.decode.instances > 0),
        "prefill.instances" if c.prefill.instances == 0 else "decode.instances",
        "prefill and decode pools come together: both > 0, or both 0 with colocated instances",
    )
    _check(
        has_pd or c.colocated.instances > 0, "colocated.instances", "the cluster has no instances"
    )
    _check(c.kv_cache.lease_timeout_s > 0, "kv_cache.lease_timeout_s", "must be > 0")
    _check(
        c.transfer.backend in ("auto", "gloo", "nccl"),
        "transfer.backend",
        f"unknown {c.transfer.backend!r}",
    )
    _check(c.transfer.timeout_s > 0, "transfer.timeout_s", "must be > 0")
    _check(
        0 < c.slo.attainment <= 1, "slo.attainment", f"must be in (0, 1], got {c.slo.attainment}"
    )
    for key in ("ttft_s", "tpot_s"):
        v = getattr(c.slo, key)
        _check(v is None or v > 0, f"slo.{key}", f"must be > 0, got {v}")
    try:
        c.engine_config("prefill" if has_pd else "colocated")
        for role in ROLES:
            c.engine_config(role)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
