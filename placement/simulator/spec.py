"""What a simulated cluster is made of: instance specs and the cluster spec.

Owns the frozen, validated description of a placement — per instance its role, parallelism and
latency model, KV capacity, batching limits, admission order and prefix caching; per cluster the
KV bytes per token and the link bandwidth. It does not own simulation state (``instance.py``).
The placement planner builds these to evaluate ``n prefill × (tp, pp) + m decode × (tp, pp)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from placement.latency_model import OPT_13B_KV_BYTES_PER_TOKEN, LatencyModel, opt13b_a100

ROLES = ("prefill", "decode", "colocated")
OPT_13B_A100_TP1_KV_TOKENS = 66144  # DistServe's capacity table, OPT-13B, TP1, PP1


@dataclass(frozen=True)
class InstanceSpec:
    """One instance: a group of ``tp × pp`` GPUs running one role."""

    role: str  # "prefill" | "decode" | "colocated"
    latency: LatencyModel = field(default_factory=opt13b_a100)  # carries tp and pp
    kv_capacity_tokens: int = OPT_13B_A100_TP1_KV_TOKENS
    max_prefill_tokens: int = 2048  # chunked-prefill token budget per step (colocated: + decodes)
    max_batch_size: int = 256  # running sequences at most (decode / colocated)
    admission: str = "fcfs"  # distserve.engine.admission order for prefill admission
    admission_options: Mapping[str, object] = field(default_factory=dict)
    prefix_caching: bool = True  # ignored for decode instances (their KV is pulled)
    instance_id: str = ""  # filled by ClusterSpec when empty

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"InstanceSpec.role must be one of {ROLES}, got {self.role!r}")
        for name in ("kv_capacity_tokens", "max_prefill_tokens", "max_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"InstanceSpec.{name} must be positive, got {getattr(self, name)}")
        if self.role == "colocated" and self.latency.pp > 1:
            raise ValueError("colocated instances with pp > 1 are not modelled; use tp only")

    @property
    def tp(self) -> int:
        return self.latency.tp

    @property
    def pp(self) -> int:
        return self.latency.pp

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class ClusterSpec:
    """The instances of one placement and the link between prefill and decode."""

    instances: tuple[InstanceSpec, ...]
    kv_bytes_per_token: float = OPT_13B_KV_BYTES_PER_TOKEN
    transfer_bandwidth_bytes_per_s: float = 100e9  # per prefill→decode pair, no contention
    # How a KV pull meets the engines' step loops. False (DistServe's model): the transfer starts
    # as soon as the decode instance has room for the request. True (our engine, whose engine
    # thread takes requests and pulls only between two steps): the decode instance admits the
    # request at the end of its current step, the pull then needs ``pull_rtt_s`` (the Decode and
    # PullKV RPCs) to reach the prefill instance, which serves it at the end of its current step.
    pulls_between_steps: bool = False
    pull_rtt_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.instances:
            raise ValueError("a cluster needs at least one instance")
        named, counts = [], dict.fromkeys(ROLES, 0)
        for spec in self.instances:
            if not spec.instance_id:
                spec = replace(spec, instance_id=f"{spec.role}-{counts[spec.role]}")
            counts[spec.role] += 1
            named.append(spec)
        ids = [s.instance_id for s in named]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate instance ids in {ids}")
        object.__setattr__(self, "instances", tuple(named))
        has_prefill = any(s.role in ("prefill", "colocated") for s in named)
        if not has_prefill:
            raise ValueError("a cluster needs a prefill or colocated instance")
        if any(s.role == "prefill" for s in named) and not any(s.role == "decode" for s in named):
            raise ValueError("prefill instances need at least one decode instance")
        if self.transfer_bandwidth_bytes_per_s <= 0:
            raise ValueError("transfer_bandwidth_bytes_per_s must be positive")
        if not self.pull_rtt_s >= 0:
            raise ValueError(f"pull_rtt_s must be >= 0, got {self.pull_rtt_s}")

    @property
    def num_gpus(self) -> int:
        return sum(s.num_gpus for s in self.instances)

    @classmethod
    def disaggregated(
        cls,
        num_prefill: int,
        num_decode: int,
        prefill: InstanceSpec | None = None,
        decode: InstanceSpec | None = None,
        **cluster_options: object,
    ) -> ClusterSpec:
        """``num_prefill`` copies of ``prefill`` and ``num_decode`` of ``decode`` (OPT-13B TP1 default)."""
        p = prefill or InstanceSpec("prefill")
        d = decode or InstanceSpec("decode")
        return cls((*[p] * num_prefill, *[d] * num_decode), **cluster_options)  # type: ignore[arg-type]

    @classmethod
    def colocated(
        cls, num_instances: int, spec: InstanceSpec | None = None, **cluster_options: object
    ) -> ClusterSpec:
        """``num_instances`` colocated instances (the data-parallel baseline)."""
        s = spec or InstanceSpec("colocated", max_prefill_tokens=512)
        return cls(tuple([s] * num_instances), **cluster_options)  # type: ignore[arg-type]
