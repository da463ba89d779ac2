"""Evaluating a placement with the cluster simulator: attainment, goodput, latency distributions.

Owns the description of a placement (``n`` prefill × (tp, pp) + ``m`` decode × (tp, pp), or
``k`` colocated × tp, and the bandwidth of the link the KV crosses), turning it into a
:class:`~placement.simulator.ClusterSpec` from a profile, and the measurements the search needs:

- ``attainment(placement, rate)``: joint TTFT-and-TPOT attainment (and each alone) at a rate;
- ``prefill_attainment(cfg, rate)``: TTFT attainment of one prefill instance alone (prompts
  with one output token, so nothing reaches decode);
- ``decode_attainment(cfg, rate, bw)``: TPOT attainment of one decode instance fed by an
  instant prefill, the KV transfer included at bandwidth ``bw``;
- ``goodput(...)``: the rate search of ``goodput.py`` over any of those.

It does not choose placements (``search.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from placement.goodput import GoodputResult, find_goodput
from placement.latency_model import LatencyModel
from placement.profile_format import ModelProfile
from placement.simulator import ClusterSpec, InstanceSpec, SimResult, simulate
from placement.workload import Workload

ROLES = ("prefill", "decode", "colocated")

INSTANT_BYTES_PER_S = 1e18  # "no transfer time": the simulator needs a positive bandwidth
_ZERO = (0.0, 0.0, 0.0)
_INSTANT = LatencyModel(prefill=_ZERO, decode_small=_ZERO, decode_large=_ZERO)
_UNBOUNDED = 1 << 40


@dataclass(frozen=True)
class PhaseConfig:
    """The parallelism of one instance."""

    tp: int
    pp: int = 1

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"tp{self.tp}" + (f"pp{self.pp}" if self.pp > 1 else "")


@dataclass(frozen=True)
class Placement:
    """What runs: a disaggregated pool pair, or colocated instances."""

    prefill: PhaseConfig | None = None
    num_prefill: int = 0
    decode: PhaseConfig | None = None
    num_decode: int = 0
    colocated: PhaseConfig | None = None
    num_colocated: int = 0
    transfer_bytes_per_s: float = INSTANT_BYTES_PER_S  # link between prefill and decode

    def __post_init__(self) -> None:
        disagg = self.prefill is not None and self.decode is not None
        if disagg == (self.colocated is not None):
            raise ValueError("a placement is either prefill + decode pools or colocated")
        if disagg and (self.num_prefill < 1 or self.num_decode < 1):
            raise ValueError("a disaggregated placement needs >= 1 prefill and >= 1 decode")
        if not disagg and self.num_colocated < 1:
            raise ValueError("a colocated placement needs >= 1 instance")

    @property
    def is_colocated(self) -> bool:
        return self.colocated is not None

    @property
    def num_gpus(self) -> int:
        if self.colocated is not None:
            return self.num_colocated * self.colocated.num_gpus
        assert self.prefill is not None and self.decode is not None
        return self.num_prefill * self.prefill.num_gpus + self.num_decode * self.decode.num_gpus

    def __str__(self) -> str:
        if self.colocated is not None:
            return f"{self.num_colocated}×colocated({self.colocated})"
        return f"{self.num_prefill}×P({self.prefill}) + {self.num_decode}×D({self.decode})"


@dataclass(frozen=True)
class SimSettings:
    """Instance limits; the cluster YAML the planner writes uses the same values."""

    prefill_token_budget: int = 2048  # prefill.max_num_batched_tokens
    max_prefill_seqs: int = 128  # prefill.max_num_seqs
    max_decode_batch: int = 256  # decode.max_num_seqs (and colocated)
    colocated_token_budget: int = 512  # colocated.max_num_batched_tokens (chunked prefill)
    policy: str = "least_load"  # router policy (the YAML's router.policy)
    # Decode and PullKV RPCs between a prefill's first token and its pull reaching the prefill
    # instance (used where the profiled engine takes pulls between steps: ours)
    pull_rtt_s: float = 0.001
    # (role, factor) pairs: that role's steps take ``factor`` times the profile's time, for a
    # serving stack measured to run slower (or faster) than the isolated profile, e.g. with
    # DISTSERVE_TIMELINE in a short live run (docs/placement.md)
    step_speed: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        pairs = tuple((str(role), float(f)) for role, f in self.step_speed)  # JSON gives lists
        for role, factor in pairs:
            if role not in ROLES:
                raise ValueError(f"step speed: unknown role {role!r} (use {', '.join(ROLES)})")
            if not (factor > 0 and math.isfinite(factor)):
                raise ValueError(f"step speed of {role} must be a positive number, got {factor}")
        object.__setattr__(self, "step_speed", pairs)

    def speed(self, role: str) -> float:
        """The factor on ``role``'s step times (1 when none is set)."""
        return dict(self.step_speed).get(role, 1.0)


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name.replace('_s', '')} SLO must be > 0 seconds, got {value}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment target must be in (0, 1], got {self.attainment}")


@dataclass(frozen=True)
class Attainment:
    joint: float  # TTFT ≤ SLO and TPOT ≤ SLO (rejected requests miss)
    ttft: float
    tpot: float

    def value(self, criterion: str) -> float:
        """``joint``, or ``separate``: both phases checked on their own (DistServe's search)."""
        return self.joint if criterion == "joint" else min(self.ttft, self.tpot)


def _share(ok: np.ndarray, total: int) -> float:
    return float(ok.sum()) / total if total else float("nan")


@dataclass
class Evaluator:
    """Simulates placements of one model on one workload against one SLO."""

    model: ModelProfile
    workload: Workload
    slo: SLO
    settings: SimSettings = field(default_factory=SimSettings)
    num_simulations: int = 0  # counter, for the planning-time report

    # ---- building clusters -----------------------------------------------------------------
    def capacity(self, cfg: PhaseConfig) -> int:
        cap = self.model.kv_capacity(cfg.tp, cfg.pp)
        if cap is None:
            raise ValueError(f"{self.model.name} does not fit in TP={cfg.tp} PP={cfg.pp}")
        return cap

    def instance(self, role: str, cfg: PhaseConfig) -> InstanceSpec:
        s = self.settings
        budget = s.colocated_token_budget if role == "colocated" else s.prefill_token_budget
        seqs = s.max_prefill_seqs if role == "prefill" else s.max_decode_batch
        latency = self.model.latency(cfg.tp, cfg.pp)
        if s.speed(role) != 1.0:
            latency = latency.scaled(s.speed(role))
        return InstanceSpec(
            role,
            latency=latency,
            kv_capacity_tokens=self.capacity(cfg),
            max_prefill_tokens=budget,
            max_batch_size=seqs,
        )

    def cluster(self, p: Placement) -> ClusterSpec:
        if p.colocated is not None:
            specs = [self.instance("colocated", p.colocated)] * p.num_colocated
        else:
            assert p.prefill is not None and p.decode is not None
            specs = [self.instance("prefill", p.prefill)] * p.num_prefill + [
                self.instance("decode", p.decode)
            ] * p.num_decode
        return ClusterSpec(
            tuple(specs),
            kv_bytes_per_token=self.model.kv_bytes_per_token,
            transfer_bandwidth_bytes_per_s=p.transfer_bytes_per_s,
            **self._pull_options(),
        )

    def _pull_options(self) -> dict[str, Any]:
        return {
            "pulls_between_steps": self.model.pulls_between_steps,
            "pull_rtt_s": self.settings.pull_rtt_s if self.model.pulls_between_steps else 0.0,
        }

    # ---- running ---------------------------------------------------------------------------
    def run(self, p: Placement, rate: float) -> SimResult:
        return self._simulate(self.cluster(p), self.workload, rate)

    def _simulate(self, cluster: ClusterSpec, workload: Workload, rate: float) -> SimResult:
        self.num_simulations += 1
        return simulate(cluster, workload.at_rate(rate), self.settings.policy)

    def measure(self, result: SimResult) -> Attainment:
        total = len(result.records) + len(result.rejected)
        return Attainment(
            joint=result.slo_attainment(self.slo.ttft_s, self.slo.tpot_s),
            ttft=_share(result.ttft_s <= self.slo.ttft_s, total),
            tpot=_share(result.tpot_s <= self.slo.tpot_s, total),
        )

    def attainment(self, p: Placement, rate: float) -> Attainment:
        return self.measure(self.run(p, rate))

    def prefill_attainment(self, cfg: PhaseConfig, rate: float) -> float:
        """TTFT attainment of one prefill instance alone."""
        sink = InstanceSpec("decode", latency=_INSTANT, kv_capacity_tokens=_UNBOUNDED)
        cluster = ClusterSpec(
            (self.instance("prefill", cfg), sink),
            kv_bytes_per_token=self.model.kv_bytes_per_token,
        )
        return self.measure(self._simulate(cluster, self.workload.only_prefill(), rate)).ttft

    def decode_attainment(self, cfg: PhaseConfig, rate: float, bytes_per_s: float) -> float:
        """TPOT attainment of one decode instance whose prompts were prefilled instantly."""
        source = InstanceSpec(
            "prefill",
            latency=_INSTANT,
            kv_capacity_tokens=_UNBOUNDED,
            max_prefill_tokens=_UNBOUNDED,
            max_batch_size=_UNBOUNDED,
        )
        cluster = ClusterSpec(
            (source, self.instance("decode", cfg)),
            kv_bytes_per_token=self.model.kv_bytes_per_token,
            transfer_bandwidth_bytes_per_s=bytes_per_s,
            **self._pull_options(),
        )
        return self.measure(self._simulate(cluster, self.workload, rate)).tpot

    def goodput(
        self, attainment: Callable[[float], float], hint_rate: float, rel_tol: float = 0.03
    ) -> GoodputResult:
        return find_goodput(attainment, self.slo.attainment, hint_rate, rel_tol)

    # ---- rate hints (only where the search starts) -------------------------------------------
    def prefill_hint(self, cfg: PhaseConfig) -> float:
        lat = self.model.latency(cfg.tp, cfg.pp)
        mean_ms = float(np.mean([lat.prefill_ms([n]) for n in self.workload.input_lens[:200]]))
        overlap = cfg.pp if lat.micro_batched else 1  # batches in flight at once
        return max(1e-3, 1000.0 * overlap / mean_ms)

    def decode_hint(self, cfg: PhaseConfig) -> float:
        lat = self.model.latency(cfg.tp, cfg.pp)
        ins, outs = self.workload.input_lens, self.workload.output_lens
        batch = min(
            self.settings.max_decode_batch, max(1, self.capacity(cfg) // int(np.mean(ins + outs)))
        )
        step_ms = lat.decode_step_latency_ms(batch, int(batch * np.mean(ins + outs / 2)))
        return max(1e-3, 1000.0 * batch / (step_ms * float(np.mean(outs))))

    def distribution(self, p: Placement, rate: float) -> dict[str, float]:
        """TTFT and TPOT percentiles (seconds) and attainment at one rate."""
        result = self.run(p, rate)
        a = self.measure(result)
        out: dict[str, float] = {"rate_per_s": rate, "attainment": a.joint}
        out.update(ttft_attainment=a.ttft, tpot_attainment=a.tpot)
        for name, values in (("ttft", result.ttft_s), ("tpot", result.tpot_s)):
            for q in (50, 90, 99):
                out[f"p{q}_{name}_s"] = float(np.percentile(values, q)) if len(values) else math.nan
        out["num_rejected"] = float(len(result.rejected))
        return out
