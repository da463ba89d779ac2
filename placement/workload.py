"""The planner's workload: request lengths (and prefixes) plus an arrival shape, at any rate.

Owns parsing the ``--workload`` spec and producing simulator requests at a given arrival rate
with common random numbers: the same lengths and the same unit-rate arrival times scaled by
1/rate, so attainment-vs-rate curves are smooth and every configuration sees the same requests.
It does not own the generators themselves (``distserve.bench.workloads``).

Specs:

    sharegpt:PATH | PATH.json       ShareGPT-format conversations (lengths: tokenizer or chars/4)
    mooncake:PATH | PATH.jsonl      Mooncake-format trace (lengths, shared 512-token blocks, and
                                    its arrival shape, rescaled to the rate)
    synthetic:in=D,out=D            D = N (fixed) | uniform:LO:HI | lognormal:MEDIAN:SIGMA
    sharegpt-like                   our synthetic stand-in for DistServe's ShareGPT chatbot set:
                                    in = 4 + 1996·Beta(1.5, 2.2); out = lognormal(median 70,
                                    σ 1.4) clipped to [2, 2048 − in]. Shape matched by eye to
                                    the length summary of DistServe's published OPT-13B ShareGPT
                                    run (input median ≈ 755, mean ≈ 790; output median ≈ 68,
                                    mean ≈ 170); it is *not* ShareGPT.

Lengths longer than the model's context are clipped (prompt ≤ max_len − 1, prompt + output ≤
max_len) and counted in ``num_clipped``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from distserve.bench import workloads
from distserve.bench.arrivals import gamma_arrivals, rescale_to_rate
from distserve.bench.workloads import WorkloadRequest

BLOCK_SIZE = 16  # prompt block size of synthetic and ShareGPT requests (the engine's default)
PREFILL_ONLY_BLOCK_SIZE = 128  # coarser blocks where KV accounting cannot matter


@dataclass(frozen=True)
class Workload:
    """Requests at unit rate (1 request/s on average); ``at_rate`` rescales their times."""

    name: str
    base: tuple[WorkloadRequest, ...]
    num_clipped: int = 0

    def __post_init__(self) -> None:
        if not self.base:
            raise ValueError(f"workload {self.name!r} has no requests")

    def at_rate(self, rate_per_s: float) -> list[WorkloadRequest]:
        if not rate_per_s > 0:
            raise ValueError(f"rate must be positive, got {rate_per_s}")
        return [_retimed(r, r.arrival_s / rate_per_s) for r in self.base]

    @property
    def has_shared_prefixes(self) -> bool:
        return any(r.prefix_group is not None for r in self.base)

    def only_prefill(self) -> Workload:
        """The same prompts with one output token each (a prefill-only run). Without shared
        prefixes the blocks are coarsened: no block is ever reused, so only the count of tokens
        matters, and fewer blocks make the simulation several times faster."""
        if self.has_shared_prefixes:
            base = tuple(replace(r, output_len=1) for r in self.base)
        else:
            coarse, next_id = [], 0
            for r in self.base:
                n = -(-r.input_len // PREFILL_ONLY_BLOCK_SIZE)
                ids = tuple(range(next_id, next_id + n))
                next_id += n
                coarse.append(
                    replace(r, output_len=1, block_ids=ids, block_size=PREFILL_ONLY_BLOCK_SIZE)
                )
            base = tuple(coarse)
        return replace(self, base=base)

    @property
    def input_lens(self) -> np.ndarray:
        return np.array([r.input_len for r in self.base])

    @property
    def output_lens(self) -> np.ndarray:
        return np.array([r.output_len for r in self.base])

    def summary(self) -> dict[str, float | int | str]:
        return {
            "name": self.name,
            "num_requests": len(self.base),
            "mean_input_len": float(self.input_lens.mean()),
            "mean_output_len": float(self.output_lens.mean()),
            "max_total_len": int((self.input_lens + self.output_lens).max()),
            "num_clipped": self.num_clipped,
        }


def from_lengths(
    name: str,
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    seed: int = 0,
    arrival_cv: float = 1.0,
    max_model_len: int | None = None,
) -> Workload:
    """Unique prompts of the given lengths with Gamma (CV 1 = Poisson) unit-rate arrivals."""
    ins, outs = np.asarray(input_lens, dtype=int), np.asarray(output_lens, dtype=int)
    ins, outs = np.maximum(ins, 1), np.maximum(outs, 1)
    clipped = 0
    if max_model_len is not None:
        new_in = np.minimum(ins, max_model_len - 1)
        new_out = np.maximum(1, np.minimum(outs, max_model_len - new_in))
        clipped = int(((new_in != ins) | (new_out != outs)).sum())
        ins, outs = new_in, new_out
    times = gamma_arrivals(len(ins), 1.0, cv=arrival_cv, seed=seed)
    base, next_id = [], 0
    for i, (n_in, n_out, t) in enumerate(zip(ins.tolist(), outs.tolist(), times)):
        blocks = -(-n_in // BLOCK_SIZE)
        base.append(
            WorkloadRequest(
                f"{name}-{i}",
                t,
                "c0",
                n_in,
                n_out,
                tuple(range(next_id, next_id + blocks)),
                BLOCK_SIZE,
            )
        )
        next_id += blocks
    return Workload(name, tuple(base), clipped)


def _dist(text: str, key: str) -> Callable[[np.random.Generator, int], np.ndarray]:
    parts = text.split(":")
    try:
        if len(parts) == 1:
            value = int(parts[0])
            if value < 1:
                raise ValueError
            return lambda rng, n: np.full(n, value)
        kind, args = parts[0], [float(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(
            f"workload {key}={text!r}: expected N, uniform:LO:HI or lognormal:MEDIAN:SIGMA"
        ) from None
    if kind == "uniform" and len(args) == 2 and 1 <= args[0] <= args[1]:
        lo, hi = int(args[0]), int(args[1])
        return lambda rng, n: rng.integers(lo, hi + 1, size=n)
    if kind == "lognormal" and len(args) == 2 and args[0] > 0 and args[1] >= 0:
        median, sigma = args
        return lambda rng, n: np.round(median * np.exp(sigma * rng.standard_normal(n)))
    raise ValueError(
        f"workload {key}={text!r}: expected N, uniform:LO:HI or lognormal:MEDIAN:SIGMA"
    )


def sharegpt_like(num_requests: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lengths of the documented ShareGPT-like chatbot shape (see the module docstring)."""
    rng = np.random.default_rng(seed)
    ins = (4 + 1996 * rng.beta(1.5, 2.2, num_requests)).astype(int)
    outs = np.round(70 * np.exp(1.4 * rng.standard_normal(num_requests)))
    return ins, np.clip(outs, 2, 2048 - ins).astype(int)


def parse_workload(
    spec: str,
    num_requests: int = 300,
    seed: int = 0,
    arrival_cv: float = 1.0,
    max_model_len: int | None = None,
    tokenizer: Callable[[str], list[int]] | None = None,
) -> Workload:
    """Build the workload ``spec`` names (see the module docstring); ValueError if unknown."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    kind, _, rest = spec.partition(":")
    if spec.endswith(".jsonl") and kind != "mooncake":
        kind, rest = "mooncake", spec
    elif spec.endswith(".json") and kind != "sharegpt":
        kind, rest = "sharegpt", spec
    if kind == "sharegpt-like":
        ins, outs = sharegpt_like(num_requests, seed)
        return from_lengths("sharegpt-like", ins, outs, seed, arrival_cv, max_model_len)
    if kind == "synthetic":
        opts = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
        unknown = set(opts) - {"in", "out"}
        if unknown or "in" not in opts or "out" not in opts:
            raise ValueError(f"workload {spec!r}: expected synthetic:in=D,out=D")
        rng = np.random.default_rng(seed)
        ins = _dist(opts["in"], "in")(rng, num_requests)
        outs = _dist(opts["out"], "out")(rng, num_requests)
        return from_lengths(spec, ins, outs, seed, arrival_cv, max_model_len)
    if kind in ("sharegpt", "mooncake"):
        path = Path(rest)
        if not path.exists():
            raise ValueError(f"workload {spec!r}: file {path} does not exist")
        if kind == "sharegpt":
            reqs = workloads.sharegpt(path, num_requests=num_requests, tokenize=tokenizer)
            return from_lengths(
                path.name,
                np.array([r.input_len for r in reqs]),
                np.array([r.output_len for r in reqs]),
                seed,
                arrival_cv,
                max_model_len,
            )
        trace = workloads.mooncake(path, num_requests=num_requests)
        if len(trace) < 2:
            raise ValueError(f"workload {spec!r}: a trace needs at least two requests")
        return _trace_workload(path.name, trace, max_model_len)
    raise ValueError(
        f"unknown workload {spec!r}; use sharegpt:PATH, mooncake:PATH, a .json/.jsonl path, "
        "sharegpt-like, or synthetic:in=D,out=D"
    )


def _trace_workload(name: str, trace: list[WorkloadRequest], max_model_len: int | None) -> Workload:
    """A trace at unit rate, its prefix blocks kept; over-long requests clipped to the context."""
    out, clipped = [], 0
    for r in rescale_to_rate(trace, 1.0):
        n_in, n_out = r.input_len, r.output_len
        if max_model_len is not None and n_in + n_out > max_model_len:
            n_in = min(n_in, max_model_len - 1)
            n_out = max(1, min(n_out, max_model_len - n_in))
            clipped += 1
            r = replace(
                r,
                input_len=n_in,
                output_len=n_out,
                block_ids=r.block_ids[: -(-n_in // r.block_size)],
            )
        out.append(r)
    return Workload(name, tuple(out), clipped)


def _retimed(r: WorkloadRequest, arrival_s: float) -> WorkloadRequest:
    """``r`` at another time. The chained block hashes are carried over (WorkloadRequest memoises
    them in its ``__dict__``); recomputing them for every simulation was a tenth of its cost."""
    r.chained_hashes()  # memoised into r.__dict__, copied below
    out = object.__new__(WorkloadRequest)  # a frozen dataclass: copy its fields, skip validation
    out.__dict__.update(r.__dict__)
    out.__dict__["arrival_s"] = arrival_s
    return out
