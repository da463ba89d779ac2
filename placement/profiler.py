"""``distserve profile``: measure the real engine on this machine and fit the latency model.

Owns the measurement grid and its driving of :class:`~distserve.engine.llm_engine.LLMEngine`
(one engine per (TP, PP) configuration, the ranks pinned: on CPU one core stands for one device
and every rank runs one thread), the KV capacity each configuration gets, the point-to-point bandwidth
(``bandwidth.py``), and the fit (``latency_model.fit_prefill`` / ``fit_decode``). It writes
nothing (the CLI saves the profile).

    prefill: one engine step over a batch of fresh prompts (max_tokens = 1) → (lens, ms)
    decode:  ``b`` prompts of ``c`` tokens prefilled, then each timed step decodes all ``b``
             → (b, Σ(context + 1), ms), context = tokens already cached before the step
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from placement.latency_model import fit_decode, fit_prefill
from placement.profile_format import ConfigProfile, HardwareProfile, ModelProfile

LARGE_BATCH_THRESHOLD = 95  # DistServe's switch between the small- and large-batch decode fits


@dataclass(frozen=True)
class ProfileOptions:
    model_path: str
    model_name: str
    tps: tuple[int, ...] = (1,)
    pps: tuple[int, ...] = (1,)
    quick: bool = False
    repeats: int | None = None  # default: 1 quick, 3 otherwise
    kv_cache_gib: float = 0.5  # CPU KV pool per rank
    max_prompt_len: int = 1024
    max_batch_size: int | None = None  # default: 32 quick, 128 otherwise
    cores: tuple[int, ...] | None = None  # default: the cores this process may run on
    device: str = "auto"
    show_progress: bool = True

    def grids(self) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Prefill batches (prompt lengths) and decode points (batch size, prompt length)."""
        top = self.max_prompt_len
        lens = [
            n for n in ((32, 128, 512) if self.quick else (16, 64, 128, 256, 512, 1024)) if n <= top
        ]
        prefill = [[n] * k for n in lens for k in ((1, 2) if self.quick else (1, 2, 4))]
        prefill += [[lens[0]] * 3 + [lens[-1]], [lens[-1], lens[len(lens) // 2]]]
        max_bs = self.max_batch_size or (32 if self.quick else 128)
        sizes = [b for b in (1, 4, 16, 32, 64, 96, 128) if b <= max_bs]  # 96, 128: large-batch fit
        ctxs = [c for c in ((32, 256) if self.quick else (32, 256, 1024)) if c <= top]
        return prefill, [(b, c) for b in sizes for c in ctxs]


def _validate(opts: ProfileOptions, cores: list[int]) -> None:
    if not (Path(opts.model_path) / "config.json").exists():
        raise ValueError(f"--model {opts.model_path}: not a checkpoint folder (no config.json)")
    if any(pp < 1 for pp in opts.pps):
        raise ValueError(f"--pp {list(opts.pps)}: pipeline sizes must be >= 1")
    ranks = max(opts.tps) * max(opts.pps)
    if opts.device == "cpu" and ranks > len(cores):
        raise ValueError(
            f"--tp {max(opts.tps)} x --pp {max(opts.pps)} needs {ranks} cores; usable: {cores}"
        )


@contextmanager
def _pinned(cores: list[int] | None) -> Iterator[None]:
    """Run on these cores with one torch thread (spawned TP ranks inherit the affinity)."""
    import torch

    old_affinity, old_threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        if cores is not None:
            os.sched_setaffinity(0, cores)
        torch.set_num_threads(1)
        yield
    finally:
        os.sched_setaffinity(0, old_affinity)
        torch.set_num_threads(old_threads)


class EngineBench:
    """Drives one engine; every prompt is fresh random tokens (no prefix reuse). ``clock``
    (seconds) is injectable so tests can drive a fake engine with synthetic step times."""

    def __init__(
        self, engine: Any, seed: int = 0, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.rng = np.random.default_rng(seed)
        self.vocab = engine.model_config.vocab_size
        self.count = 0

    def _add(self, prompt_len: int, max_tokens: int) -> None:
        from distserve.engine.sampling_params import SamplingParams

        ids = self.rng.integers(0, self.vocab, size=prompt_len).tolist()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request(f"profile-{self.count}", ids, params)
        self.count += 1

    def prefill_ms(self, lens: list[int]) -> float:
        for n in lens:
            self._add(n, 1)
        t0 = self.clock()
        outs = self.engine.step()
        ms = (self.clock() - t0) * 1e3
        if len(outs) != len(lens) or self.engine.has_unfinished_requests():
            raise RuntimeError(f"prefill batch {lens} did not finish in one step")
        return ms

    def decode_ms(
        self, batch: int, prompt_len: int, steps: int, budget: int
    ) -> list[tuple[int, int, float]]:
        """Time ``steps`` decode steps of ``batch`` sequences; prompts that were prefilled in
        earlier steps have decoded a few tokens more, which Σ(context + 1) accounts for."""
        first = self.count
        self._add_many(batch, prompt_len, steps + 2 + -(-batch * prompt_len // budget))
        ids = [f"profile-{i}" for i in range(first, self.count)]
        generated = dict.fromkeys(ids, 0)
        while min(generated.values()) == 0:  # prefill every prompt (maybe over several steps)
            for o in self.engine.step():
                generated[o.request_id] += 1
        samples = []
        for _ in range(steps):
            sum_ctx = sum(prompt_len + g for g in generated.values())
            t0 = self.clock()
            outs = self.engine.step()
            ms = (self.clock() - t0) * 1e3
            if len(outs) != batch:
                raise RuntimeError(f"decode step of batch {batch} ran {len(outs)} requests")
            for o in outs:
                generated[o.request_id] += 1
            samples.append((batch, sum_ctx, ms))
        for rid in ids:
            self.engine.abort(rid)
        return samples

    def _add_many(self, count: int, prompt_len: int, max_tokens: int) -> None:
        for _ in range(count):
            self._add(prompt_len, max_tokens)


Samples = tuple[list[tuple[list[int], float]], list[tuple[int, int, float]]]


def measure(
    bench: EngineBench,
    opts: ProfileOptions,
    budget: int,
    capacity: int,
    max_len: int,
    on_point: Callable[[], None] = lambda: None,
) -> Samples:
    """Prefill samples (prompt lengths, ms) and decode samples (batch, Σ(ctx + 1), ms)."""
    prefill_grid, decode_grid = opts.grids()
    repeats = opts.repeats or (1 if opts.quick else 3)
    bench.prefill_ms([8])  # warm-up
    prefill = []
    for lens in prefill_grid:
        lens = [min(n, max_len - 1) for n in lens]
        prefill.append((lens, statistics.median(bench.prefill_ms(lens) for _ in range(repeats))))
        on_point()
    decode = []
    steps = 2 if opts.quick else 4
    for batch, ctx in decode_grid:
        if batch * (ctx + steps + 2) <= 0.9 * capacity:
            runs = [bench.decode_ms(batch, ctx, steps, budget) for _ in range(repeats)]
            for k in range(steps):  # the median over repeats of step k
                decode.append((batch, runs[0][k][1], statistics.median(r[k][2] for r in runs)))
        on_point()
    return prefill, decode


def fit_config(tp: int, samples: Samples, capacity: int, pp: int = 1) -> ConfigProfile:
    """Least-squares fit (relative error) of one (TP, PP) configuration's samples. With pp > 1
    the measured step is one whole pass through every stage (the engine does not micro-batch),
    i.e. the latency model's full-model time; the stage hops are inside it."""
    prefill, decode = samples
    p_fit = fit_prefill(prefill)
    small, large = fit_decode(decode, LARGE_BATCH_THRESHOLD)
    fit = {
        name: None
        if f is None
        else {k: getattr(f, k) for k in ("mean_rel_error", "max_rel_error", "num_samples")}
        for name, f in (("prefill", p_fit), ("decode_small", small), ("decode_large", large))
    }
    return ConfigProfile(
        tp=tp,
        pp=pp,
        prefill=p_fit.coeffs,
        decode_small=small.coeffs,
        decode_large=(large or small).coeffs,
        kv_capacity_tokens=capacity,
        large_batch_threshold=LARGE_BATCH_THRESHOLD,
        micro_batched=False,  # our engine runs a step's stages one after another
        fit=fit,
        samples={
            "prefill": [[*lens, ms] for lens, ms in prefill],
            "decode": [list(x) for x in decode],
        },
    )


def _profile_tp(
    opts: ProfileOptions, tp: int, device: str, bar: Any, pp: int = 1
) -> tuple[ConfigProfile, dict[str, Any]]:
    from distserve.config import CacheConfig, EngineConfig, ParallelConfig
    from distserve.engine.llm_engine import LLMEngine
    from distserve.engine.scheduler import SchedulerConfig

    prefill_grid, decode_grid = opts.grids()
    budget = max(sum(b) for b in prefill_grid) + max(b for b, _ in decode_grid)
    config = EngineConfig(
        model=opts.model_path,
        device=device,
        num_threads=1 if device == "cpu" else None,
        cache=CacheConfig(
            block_size=16, cpu_memory_gib=opts.kv_cache_gib, enable_prefix_caching=False
        ),
        parallel=ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max(256, budget)),
    )
    engine = LLMEngine(config)
    try:
        capacity = engine.num_blocks * engine.kv_spec.block_size
        info = {
            "kv_bytes_per_token": engine.kv_spec.block_bytes(1) // engine.kv_spec.block_size,
            "max_model_len": engine.max_model_len,
        }
        samples = measure(
            EngineBench(engine, seed=tp), opts, budget, capacity, engine.max_model_len, bar.update
        )
    finally:
        engine.shutdown()
    return fit_config(tp, samples, capacity, pp), info


def run_profiler(opts: ProfileOptions) -> tuple[HardwareProfile, str]:
    """Measure every (TP, PP) and the link; returns the profile and a text report of the fit."""
    import torch
    from tqdm import tqdm

    from placement.bandwidth import measure_p2p_bandwidth

    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = ProfileOptions(**{**opts.__dict__, "device": device})
    cores = list(opts.cores) if opts.cores else sorted(os.sched_getaffinity(0))
    _validate(opts, cores)
    prefill_grid, decode_grid = opts.grids()
    total = len(opts.tps) * len(opts.pps) * (len(prefill_grid) + len(decode_grid)) + 1
    configs: dict[tuple[int, int], ConfigProfile] = {}
    info: dict[str, Any] = {}
    with tqdm(total=total, desc="profiling", unit="point", disable=not opts.show_progress) as bar:
        for tp in opts.tps:
            for pp in opts.pps:
                bar.set_description(f"profiling TP={tp} PP={pp}")
                with _pinned(cores[: tp * pp] if device == "cpu" else None):
                    cfg, info = _profile_tp(opts, tp, device, bar, pp)
                configs[tp, pp] = cfg
        bar.set_description("bandwidth")
        pair = (cores[0], cores[1 % len(cores)]) if device == "cpu" else None
        bw = measure_p2p_bandwidth(device, pair, repeats=2 if opts.quick else 5)
        bar.update(1)
    model = ModelProfile(
        name=opts.model_name,
        kv_bytes_per_token=int(info["kv_bytes_per_token"]),
        configs=configs,
        path=str(Path(opts.model_path).resolve()),
        max_model_len=int(info["max_model_len"]),
        kv_cache_memory_gib=opts.kv_cache_gib if device == "cpu" else None,
        pulls_between_steps=True,  # our engine thread takes KV pulls between steps
    )
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({len(cores)} cores)"
    profile = HardwareProfile(
        models={opts.model_name: model},
        intra_node_bytes_per_s=bw.bytes_per_s,
        inter_node_bytes_per_s=bw.bytes_per_s,
        device=device,
        device_name=device_name,
        meta={
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": os.uname().nodename,
            "notes": "one pinned core per device, one thread per rank" if device == "cpu" else "",
            "bandwidth": {
                "method": f"{bw.backend} send/recv round trip between two processes",
                "per_size_bytes_per_s": {str(k): v for k, v in bw.per_size.items()},
                "inter_node_measured": False,
                "inter_node_note": "one machine: inter-node set to the measured intra-node value",
                "cores": list(bw.cores) if bw.cores else None,
            },
        },
    )
    return profile, fit_report(model, bw.bytes_per_s)


def fit_report(model: ModelProfile, bytes_per_s: float) -> str:
    lines = [
        f"{model.name}: KV {model.kv_bytes_per_token} bytes/token; link {bytes_per_s / 1e9:.2f} GB/s"
    ]
    for (tp, pp), c in sorted(model.configs.items()):
        lines.append(f"  TP={tp} PP={pp}: KV capacity {c.kv_capacity_tokens} tokens")
        for name in ("prefill", "decode_small", "decode_large"):
            f = c.fit.get(name)
            coeffs = ", ".join(f"{x:.4g}" for x in getattr(c, name))
            err = (
                "no samples (copy of decode_small)"
                if f is None
                else (
                    f"mean |rel err| {f['mean_rel_error']:.1%}, max {f['max_rel_error']:.1%}, "
                    f"{f['num_samples']} samples"
                )
            )
            lines.append(f"    {name:<12} [{coeffs}]  {err}")
    return "\n".join(lines)
