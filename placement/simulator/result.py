"""What a simulation returns, and the metrics computed from it.

Owns :class:`SimResult` (per-request records, router decision times, per-instance busy time) and
its helpers: SLO attainment (ALGORITHMS.md §1: TTFT ≤ SLO **and** TPOT ≤ SLO; rejected requests
count as misses), prefix hit rate, throughput, load imbalance, and per-client fairness (service =
input + ``w_out`` × output tokens, VTC's measure). It does not own goodput search (the planner).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from placement.simulator.request import RequestRecord


@dataclass(frozen=True)
class Fairness:
    """Per-client service over the interval where every client is still sending."""

    service_gap: float  # max over time of (max − min) cumulative service, tokens
    window_gap: float  # the same over sliding windows of a tenth of the interval
    relative_gap: float  # service_gap / mean per-client service at the end of the interval
    jain_index: float  # (Σx)² / (n·Σx²) of per-client service over the interval
    num_clients: int


@dataclass(frozen=True)
class SimResult:
    records: tuple[RequestRecord, ...]  # finished requests, in finishing order
    rejected: tuple[str, ...]  # requests that could never fit an instance's KV
    decision_s: tuple[float, ...]  # wall time of each choose_prefill call
    busy_s: Mapping[str, float]  # per instance, time its first stage was busy
    roles: Mapping[str, str]
    num_gpus: int
    end_s: float  # simulated time of the last event

    def column(self, name: str) -> np.ndarray:
        return np.array([getattr(r, name) for r in self.records], dtype=float)

    @property
    def ttft_s(self) -> np.ndarray:
        return self.column("ttft_s")

    @property
    def tpot_s(self) -> np.ndarray:
        return self.column("tpot_s")

    @property
    def e2e_s(self) -> np.ndarray:
        return self.column("e2e_s")

    def slo_attainment(self, ttft_slo_s: float, tpot_slo_s: float) -> float:
        """Share of all requests (rejected included) meeting both SLOs."""
        total = len(self.records) + len(self.rejected)
        if total == 0:
            return float("nan")
        ok = (self.ttft_s <= ttft_slo_s) & (self.tpot_s <= tpot_slo_s)
        return float(ok.sum()) / total

    @property
    def prefix_hit_rate(self) -> float:
        prompt = sum(r.input_len for r in self.records)
        return sum(r.num_cached_tokens for r in self.records) / prompt if prompt else 0.0

    @property
    def throughput_rps(self) -> float:
        if not self.records:
            return 0.0
        span = max(r.finish_s for r in self.records) - min(r.arrival_s for r in self.records)
        return len(self.records) / span if span > 0 else float("inf")

    def load_imbalance(self) -> float:
        """max / mean busy time over the instances that prefill (1.0 = perfectly even)."""
        busy = [b for iid, b in self.busy_s.items() if self.roles[iid] != "decode"]
        mean = float(np.mean(busy)) if busy else 0.0
        return max(busy) / mean if mean > 0 else 1.0

    def fairness(
        self, w_out: float = 2.0, num_samples: int = 200, uncached_only: bool = False
    ) -> Fairness:
        """Service fairness while all clients send: from the last client's first arrival to the
        first client's last arrival (a proxy for 'continuously backlogged' under overload).
        ``uncached_only`` counts only uncached input tokens (what DLPM charges) instead of all."""
        by_client: dict[str, list[RequestRecord]] = {}
        for r in self.records:
            by_client.setdefault(r.client_id, []).append(r)
        n = len(by_client)
        t0 = max((min(r.arrival_s for r in rs) for rs in by_client.values()), default=0.0)
        t1 = min((max(r.arrival_s for r in rs) for rs in by_client.values()), default=0.0)
        if n < 2 or t1 <= t0:
            return Fairness(0.0, 0.0, 0.0, 1.0, n)
        times = np.linspace(t0, t1, num_samples)
        service = np.stack([_service(rs, times, w_out, uncached_only) for rs in by_client.values()])
        service -= service[:, :1]
        gap = float((service.max(axis=0) - service.min(axis=0)).max())
        k = max(1, num_samples // 10)
        inc = service[:, k:] - service[:, :-k]
        window_gap = float((inc.max(axis=0) - inc.min(axis=0)).max())
        final = service[:, -1]
        mean = float(final.mean())
        jain = float(final.sum() ** 2 / (n * (final**2).sum())) if mean > 0 else 1.0
        return Fairness(gap, window_gap, gap / mean if mean > 0 else 0.0, jain, n)

    def summary(
        self, ttft_slo_s: float | None = None, tpot_slo_s: float | None = None
    ) -> dict[str, float]:
        ttft, e2e = self.ttft_s, self.e2e_s
        out = {
            "num_finished": float(len(self.records)),
            "num_rejected": float(len(self.rejected)),
            "avg_ttft_s": float(ttft.mean()) if len(ttft) else float("nan"),
            "p99_ttft_s": float(np.percentile(ttft, 99)) if len(ttft) else float("nan"),
            "avg_e2e_s": float(e2e.mean()) if len(e2e) else float("nan"),
            "p99_e2e_s": float(np.percentile(e2e, 99)) if len(e2e) else float("nan"),
            "avg_tpot_s": float(self.tpot_s.mean()) if len(e2e) else float("nan"),
            "prefix_hit_rate": self.prefix_hit_rate,
            "throughput_rps": self.throughput_rps,
            "load_imbalance": self.load_imbalance(),
            "decision_p99_ms": float(np.percentile(self.decision_s, 99) * 1e3)
            if self.decision_s
            else 0.0,
        }
        if ttft_slo_s is not None and tpot_slo_s is not None:
            out["slo_attainment"] = self.slo_attainment(ttft_slo_s, tpot_slo_s)
        return out


def _service(
    records: list[RequestRecord], times: np.ndarray, w_out: float, uncached_only: bool
) -> np.ndarray:
    """Cumulative service of one client at ``times``: its input when its first token is out,
    then its output tokens at an even pace until it finishes."""
    first = np.array([r.first_token_s for r in records])[:, None]
    finish = np.array([r.finish_s for r in records])[:, None]
    n_in = np.array(
        [r.input_len - (r.num_cached_tokens if uncached_only else 0) for r in records], dtype=float
    )[:, None]
    n_out = np.array([r.output_len for r in records], dtype=float)[:, None]
    started = times[None, :] >= first
    span = np.maximum(finish - first, 1e-12)
    progress = np.clip((times[None, :] - first) / span, 0.0, 1.0)
    out_tokens = np.where(started, 1.0 + (n_out - 1.0) * progress, 0.0)
    return (np.where(started, n_in, 0.0) + w_out * out_tokens).sum(axis=0)
