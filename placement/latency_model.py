"""Step-time model of one instance: prefill batches, decode steps, pipeline stages, KV transfer.

Owns the DistServe-style latency formulas (ALGORITHMS.md §2), their least-squares fit on relative
error, and loading DistServe's fitted A100 coefficients. It does not own any scheduling: the
simulator decides what goes into a step, this module only says how long the step takes.

    prefill batch (ms)  = a + b·Σl + c·Σl²                       l = prompt lengths
    decode step (ms)    = a + b·Σ(ctx+1) + c·batch                small / large coefficient sets
    pipeline (pp > 1)   : per-stage time = t/pp + stage overhead; a batch takes pp stages
                          (micro_batched = False, our engine: stages run one after another, a
                          step is the whole pass t + pp·overhead and nothing overlaps)
    KV transfer (s)     = bytes / link bandwidth

Chunks and cached prefixes (our extension, consistent with the formula above): extending a
sequence from ``k`` computed tokens to ``k + n`` costs ``b·n + c·((k+n)² − k²)``, so a prompt
computed in several chunks, or after a cached prefix of ``k`` tokens, costs what the telescoping
sum says and an uncached unchunked prompt costs exactly ``b·l + c·l²``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

DEFAULT_PROFILE_PATH = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "distserve_a100_profile.json"
)
DEFAULT_CAPACITY_PATH = DEFAULT_PROFILE_PATH.with_name("distserve_a100_max_num_tokens.csv")
OPT_13B = "facebook/opt-13b"
OPT_13B_KV_BYTES_PER_TOKEN = 40 * 2 * 5120 * 2  # layers × (K, V) × hidden × fp16 bytes
OPT_13B_A100_TP1 = {  # DistServe's fit (ms), copied from the profile so tests need no ../shared
    "prefill": (18.10254647486372, 0.1019122572698738, 7.122264314252114e-06),
    "decoding_smallbs": (19.934702624895458, 0.0006269356524350583, 0.03850697740828398),
    "decoding_largebs": (7.1661889468253595, 0.0005798000403396046, 0.15831096191764046),
}

Coeffs = tuple[float, float, float]


@dataclass(frozen=True)
class LatencyModel:
    """Step times (ms) of one instance of a given (model, tp, pp)."""

    prefill: Coeffs  # (a, b, c) of a + b·Σl + c·Σl²
    decode_small: Coeffs  # (a, b, c) of a + b·Σ(ctx+1) + c·batch, batch <= threshold
    decode_large: Coeffs  # the same for batch > threshold
    large_batch_threshold: int = 95
    tp: int = 1
    pp: int = 1
    stage_overhead_ms: float = 0.0  # added per pipeline stage when pp > 1
    # pp > 1: does the engine overlap micro-batches across stages (DistServe's does), or run a
    # step's stages one after another (ours; its measured pp entries are whole-pass times)?
    micro_batched: bool = True

    def __post_init__(self) -> None:
        if self.pp < 1 or self.tp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")

    def scaled(self, factor: float) -> LatencyModel:
        """Every step ``factor`` times as long (a device that serves slower than it profiled)."""

        def times(c: Coeffs) -> Coeffs:
            return (c[0] * factor, c[1] * factor, c[2] * factor)

        return replace(
            self,
            prefill=times(self.prefill),
            decode_small=times(self.decode_small),
            decode_large=times(self.decode_large),
            stage_overhead_ms=self.stage_overhead_ms * factor,
        )

    # ---- full-model times (one pipeline pass, no stage split) ----
    def prefill_ms(self, prompt_lens: Iterable[int]) -> float:
        """Time of one uncached, unchunked prefill batch."""
        a, b, c = self.prefill
        lens = list(prompt_lens)
        return a + b * sum(lens) + c * sum(x * x for x in lens)

    def extend_work_ms(self, num_new_tokens: int, num_context_tokens: int) -> float:
        """Marginal prefill work of extending ``k`` computed tokens by ``n`` (no constant term)."""
        _, b, c = self.prefill
        k, n = num_context_tokens, num_new_tokens
        return b * n + c * ((k + n) * (k + n) - k * k)

    def decode_ms(self, batch_size: int, sum_ctx_plus_one: int) -> float:
        """Time of one decode step of ``batch_size`` sequences with Σ(context+1) tokens."""
        if batch_size <= 0:
            return 0.0
        a, b, c = (
            self.decode_small if batch_size <= self.large_batch_threshold else self.decode_large
        )
        return a + b * sum_ctx_plus_one + c * batch_size

    # ---- pipelined times: what the simulator uses ----
    def prefill_stage_ms(self, work_ms: float) -> float:
        """How long a prefill batch of ``work_ms`` (incl. ``a``) occupies one pipeline stage
        (without micro-batching: the whole instance, for the whole pass)."""
        if self.pp > 1 and not self.micro_batched:
            return self.prefill_batch_latency_ms(work_ms)
        return work_ms / self.pp + (self.stage_overhead_ms if self.pp > 1 else 0.0)

    def prefill_batch_latency_ms(self, work_ms: float) -> float:
        """From the batch entering stage 1 to its last stage finishing."""
        if self.pp > 1 and not self.micro_batched:
            return work_ms + self.pp * self.stage_overhead_ms
        return self.pp * self.prefill_stage_ms(work_ms)

    def decode_step_latency_ms(self, batch_size: int, sum_ctx_plus_one: int) -> float:
        """Time between two tokens of one sequence under pipelining.

        With pp > 1 (and micro-batching) the batch is split into pp micro-batches that chase each other through the
        stages; every sequence gets one token per round of pp stage times, each stage running a
        micro-batch of ``batch/pp`` sequences for 1/pp of the model.
        """
        if self.pp == 1:
            return self.decode_ms(batch_size, sum_ctx_plus_one)
        if not self.micro_batched:  # one whole pass per step, stage after stage
            return self.decode_ms(batch_size, sum_ctx_plus_one) + self.pp * self.stage_overhead_ms
        micro = max(1, round(batch_size / self.pp))
        return (
            self.decode_ms(micro, round(sum_ctx_plus_one / self.pp))
            + self.pp * self.stage_overhead_ms
        )

    @classmethod
    def from_profile(
        cls,
        model: str = OPT_13B,
        tp: int = 1,
        pp: int = 1,
        path: str | Path = DEFAULT_PROFILE_PATH,
        stage_overhead_ms: float = 0.0,
    ) -> LatencyModel:
        """Load DistServe's fitted coefficients for ``model`` at ``tp`` (pp is modelled, not fitted)."""
        if not Path(path).exists():
            raise FileNotFoundError(
                f"latency profile {path} not found (opt13b_a100() needs no file)"
            )
        profile = json.loads(Path(path).read_text())
        if model not in profile:
            raise ValueError(f"model {model!r} not in {path}; available: {sorted(profile)}")
        entry = profile[model].get(str(tp))
        if entry is None:
            raise ValueError(
                f"{model} has no TP={tp} entry in {path}; available: {sorted(profile[model])}"
            )
        return cls(
            prefill=tuple(entry["prefill"]),  # type: ignore[arg-type]
            decode_small=tuple(entry["decoding_smallbs"]),  # type: ignore[arg-type]
            decode_large=tuple(entry["decoding_largebs"]),  # type: ignore[arg-type]
            large_batch_threshold=int(entry.get("decoding_large_small_bs_threshold", 95)),
            tp=tp,
            pp=pp,
            stage_overhead_ms=stage_overhead_ms,
        )


def opt13b_a100(pp: int = 1, stage_overhead_ms: float = 0.0) -> LatencyModel:
    """The default model: DistServe's OPT-13B, TP=1, A100 fit (embedded, no file needed)."""
    return LatencyModel(
        prefill=OPT_13B_A100_TP1["prefill"],
        decode_small=OPT_13B_A100_TP1["decoding_smallbs"],
        decode_large=OPT_13B_A100_TP1["decoding_largebs"],
        pp=pp,
        stage_overhead_ms=stage_overhead_ms,
    )


def kv_capacity_tokens(
    model: str, tp: int, pp: int, path: str | Path = DEFAULT_CAPACITY_PATH
) -> int:
    """KV-cache capacity in tokens of one (model, tp, pp) instance on A100-80GB (DistServe's table)."""
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["model"] == model and int(row["tp"]) == tp and int(row["pp"]) == pp:
                return int(row["max_num_tokens"])
    raise ValueError(f"no KV capacity for {model} tp={tp} pp={pp} in {path}")


def kv_transfer_s(num_tokens: int, bytes_per_token: float, bandwidth_bytes_per_s: float) -> float:
    """Time to move ``num_tokens`` tokens of KV over a link (no contention modelled)."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth_bytes_per_s}")
    return num_tokens * bytes_per_token / bandwidth_bytes_per_s


# ---------------------------------------------------------------- fitting


@dataclass(frozen=True)
class FitResult:
    """Coefficients from a least-squares fit on relative error, and how well they fit."""

    coeffs: Coeffs
    mean_rel_error: float
    max_rel_error: float
    num_samples: int


def _fit_relative(features: np.ndarray, times_ms: np.ndarray) -> FitResult:
    if len(times_ms) < features.shape[1]:
        raise ValueError(f"need at least {features.shape[1]} samples to fit, got {len(times_ms)}")
    if np.any(times_ms <= 0):
        raise ValueError("timing samples must be positive")
    # minimise Σ((x·θ − y)/y)²: ordinary least squares on rows scaled by 1/y
    scaled = features / times_ms[:, None]
    theta, *_ = np.linalg.lstsq(scaled, np.ones_like(times_ms), rcond=None)
    rel = np.abs(features @ theta - times_ms) / times_ms
    return FitResult(
        coeffs=(float(theta[0]), float(theta[1]), float(theta[2])),
        mean_rel_error=float(rel.mean()),
        max_rel_error=float(rel.max()),
        num_samples=len(times_ms),
    )


def fit_prefill(samples: Sequence[tuple[Sequence[int], float]]) -> FitResult:
    """Fit ``a + b·Σl + c·Σl²`` from ``(prompt_lens_of_batch, measured_ms)`` samples."""
    feats = np.array(
        [[1.0, float(sum(lens)), float(sum(x * x for x in lens))] for lens, _ in samples]
    )
    return _fit_relative(feats, np.array([ms for _, ms in samples], dtype=float))


def fit_decode(
    samples: Sequence[tuple[int, int, float]], large_batch_threshold: int = 95
) -> tuple[FitResult, FitResult | None]:
    """Fit the small- and large-batch decode sets from ``(batch_size, Σ(ctx+1), ms)`` samples.

    Returns ``(small, large)``; ``large`` is None when no sample is above the threshold.
    """
    small = [s for s in samples if s[0] <= large_batch_threshold]
    large = [s for s in samples if s[0] > large_batch_threshold]

    def fit(rows: Sequence[tuple[int, int, float]]) -> FitResult:
        feats = np.array([[1.0, float(total), float(bs)] for bs, total, _ in rows])
        return _fit_relative(feats, np.array([ms for *_, ms in rows], dtype=float))

    if not small:
        raise ValueError(f"no decode sample with batch size <= {large_batch_threshold}")
    return fit(small), (fit(large) if large else None)
