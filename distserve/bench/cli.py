"""``distserve bench``: load generator and SLO report against a running endpoint.

The top-level CLI (``distserve/cli.py``) wires it in::

    sub = subparsers.add_parser("bench", help="measure a running endpoint")
    add_bench_arguments(sub)
    ...
    return run_bench(args)

One run: build the prompts once, then for each rate send them all with Poisson/Gamma arrivals,
print a table, and (``--out``) write one JSON object ``{"config", "results": [per rate],
"goodput"}`` and (``--plot``) an attainment-vs-rate figure. Exit code: 0 when it ran (failed
requests are counted and printed, never hidden), 1 when every request of some rate failed,
2 for bad arguments or an endpoint that cannot be reached at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from distserve.bench.backends import Backend, GrpcBackend, OpenAIBackend, pick_backend
from distserve.bench.load import arrival_times, run_rate
from distserve.bench.plot import plot_attainment
from distserve.bench.prompts import BenchPrompt, PromptOptions, build_prompts
from distserve.bench.report import RateResult, find_goodput, format_table, summarize, to_json
from distserve.client import DistserveError


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument(
        "--endpoint",
        required=True,
        help="grpc://host:port (distserve SDK) or http(s)://host:port (OpenAI API)",
    )
    p.add_argument("--backend", choices=["auto", "grpc", "openai"], default="auto")
    p.add_argument("--model", default=None, help="OpenAI 'model' (default: from /v1/models)")
    p.add_argument(
        "--dataset", default="random", help="random | shared-prefix | sharegpt:PATH | mooncake:PATH"
    )
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (random, shared)")
    p.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="tokens to generate (default: 128, or the dataset's own)",
    )
    p.add_argument(
        "--range-ratio", type=float, default=0.0, help="random: lengths uniform in L·[1−r, 1+r]"
    )
    p.add_argument(
        "--prefix-len",
        type=int,
        default=None,
        help="shared-prefix: shared tokens (default 3/4 of --input-len)",
    )
    p.add_argument("--num-prefix-groups", type=int, default=8)
    rates = p.add_mutually_exclusive_group()
    rates.add_argument("--rate", type=float, default=None, help="requests/s (inf: all at once)")
    rates.add_argument("--rates", default=None, help="comma-separated sweep, e.g. 1,2,4,8")
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="Gamma shape of the gaps: 1 = Poisson, <1 burstier",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds")
    p.add_argument("--attainment", type=float, default=0.9, help="goodput target (default 0.9)")
    p.add_argument(
        "--num-devices", type=int, default=1, help="devices used, for per-device goodput"
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--prompt-as-text",
        action="store_true",
        help="send text instead of token ids (needs --tokenizer)",
    )
    p.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer folder or name")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="for token-id prompts when the endpoint does not say",
    )
    p.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not ask the server to ignore end-of-sequence",
    )
    p.add_argument("--extra-body", default=None, help="JSON merged into each OpenAI request")
    p.add_argument("--warmup-requests", type=int, default=0, help="sent before measuring")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="write the attainment-vs-rate plot here")
    p.add_argument("--save-requests", action="store_true", help="per-request records in JSON")
    p.add_argument("--disable-tqdm", action="store_true")


def run_bench(args: argparse.Namespace) -> int:
    """Run the ``bench`` subcommand; returns the process exit code."""
    try:
        rates = _parse_rates(args)
        extra_body = json.loads(args.extra_body) if args.extra_body else None
        if args.burstiness <= 0 or args.num_prompts < 1:
            raise ValueError("--burstiness must be > 0 and --num-prompts >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_run(args, rates, extra_body))


def _parse_rates(args: argparse.Namespace) -> list[float]:
    if args.rates:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    else:
        rates = [args.rate if args.rate is not None else math.inf]
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"rates must be positive, got {rates}")
    return rates


def _make_backend(args: argparse.Namespace, extra_body: dict[str, Any] | None) -> Backend:
    kind = pick_backend(args.endpoint, args.backend)
    common = {
        "temperature": args.temperature,
        "ignore_eos": not args.no_ignore_eos,
        "timeout_s": args.request_timeout,
    }
    if kind == "grpc":
        return GrpcBackend(args.endpoint, **common)
    return OpenAIBackend(args.endpoint, model=args.model, extra_body=extra_body, **common)


async def _run(args: argparse.Namespace, rates: list[float], extra_body: Any) -> int:
    try:
        backend = _make_backend(args, extra_body)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        # One seed for lengths and arrival gaps (each rate's gaps are the same draws, scaled by
        # 1/rate); token content fresh for the warm-up and for each rate, so that no run is
        # served from the prefix cache a previous one filled (ShareGPT text is what the file
        # has: the same at every rate).
        make_prompts = await _prompt_maker(args, backend)
        if args.warmup_requests:
            warmup = make_prompts(0)[: args.warmup_requests]
            await run_rate(backend, warmup, [0.0] * len(warmup), show_progress=False)
        results = []
        for i, rate in enumerate(rates):
            prompts = make_prompts(i + 1)
            is_trace = args.dataset.startswith("mooncake:")
            times = arrival_times(prompts, rate, args.burstiness, args.seed, is_trace)
            cpu_start = time.process_time()
            records, duration_s = await run_rate(
                backend,
                prompts,
                times,
                max_concurrency=args.max_concurrency,
                label=f"rate {rate:g}/s",
                show_progress=not args.disable_tqdm,
            )
            result = summarize(rate, records, duration_s, args.ttft_slo, args.tpot_slo)
            result.client_cpu_s = time.process_time() - cpu_start
            if args.save_requests:
                result.requests = [_record_json(r, records[0].send_s) for r in records]
            results.append(result)
    except (ValueError, OSError, DistserveError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        await backend.close()
    return _report(args, rates, results)


async def _prompt_maker(
    args: argparse.Namespace, backend: Backend
) -> Callable[[int], list[BenchPrompt]]:
    """``make(k)``: the run's prompts with token content number ``k`` (same lengths for all k)."""
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    info = await backend.describe()
    vocab_size = args.vocab_size or (len(tokenizer) if tokenizer is not None else info.vocab_size)
    opts = PromptOptions(
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        prefix_len=args.prefix_len,
        num_prefix_groups=args.num_prefix_groups,
        seed=args.seed,
        as_text=args.prompt_as_text,
    )
    made: dict[int, list[BenchPrompt]] = {}

    def make(k: int) -> list[BenchPrompt]:
        if k not in made:
            content = replace(opts, content_seed=args.seed + 1_000_003 * k)
            made[k] = build_prompts(args.dataset, content, vocab_size, tokenizer)
        return made[k]

    make(0)  # bad options fail here, before anything is sent
    return make


def _record_json(rec: Any, start_s: float) -> dict[str, Any]:
    out = dict(vars(rec))
    out["send_s"] = rec.send_s - start_s
    return out


def _report(args: argparse.Namespace, rates: list[float], results: list[RateResult]) -> int:
    print(format_table(results))
    for r in results:
        for message, count in r.errors.items():
            print(f"rate {r.rate_per_s:g}/s: {count} failed: {message}", file=sys.stderr)
    points = [(r.rate_per_s, r.slo_attainment) for r in results if r.slo_attainment is not None]
    goodput = find_goodput(points, args.attainment, args.num_devices)
    if points:
        shown = f"{goodput.rate_per_s:.3f} req/s" if goodput.rate_per_s is not None else "none"
        print(f"goodput at {args.attainment:g} attainment: {shown} ({goodput.note})")
    config = {
        k: v
        for k, v in vars(args).items()
        if not k.startswith("_") and isinstance(v, (str, int, float, bool, list, type(None)))
    }
    config["rates"] = rates
    report = to_json(config, results, goodput)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.plot:
        try:
            plot_attainment(results, args.attainment, goodput, args.plot, title=args.endpoint)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 1 if any(r.num_completed == 0 for r in results) else 0
