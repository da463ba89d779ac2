"""Routing benchmark: policies × workloads × cluster sizes, fairness, router decision time.

Everything runs in the cluster simulator (``placement.simulator``) with DistServe's OPT-13B A100
latency fit, driving the same policy objects the live router uses. Three parts:

1. routing — prefix-heavy Preble-like workloads (and a Mooncake trace with ``--trace``) at 4, 16
   and 64 prefill instances (+ as many decode instances), every policy at the same arrival rate;
2. fairness — a multi-client mix (one client with long uncached prompts, others with short cached
   ones) under overload: per-client service gap and Jain's index for VTC-like, plain LPM, Preble
   and D²LPM pairings of routing policy and instance admission order;
3. decision time — ``choose_prefill`` wall and CPU time with 64 instances and 10k cached prefixes.

    python benchmarks/routing.py --quick --out routing.json --plot routing.png [--trace PATH]
    python benchmarks/routing.py --quick --parts routing --sizes 4,16,64 --all-workloads \
        --policies round_robin,cache_aware,preble,d2lpm --trace PATH --markdown table.md
"""

from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from distserve.bench.arrivals import poisson_arrivals, rescale_to_rate, with_arrivals
from distserve.bench.workloads import WorkloadRequest, make_workload
from distserve.router.policies import InstanceLoad, RouteRequest, make_policy
from placement.latency_model import LatencyModel, opt13b_a100
from placement.simulator import ClusterSpec, InstanceSpec, simulate

POLICIES = ["round_robin", "least_load", "cache_aware", "preble", "d2lpm"]
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # label -> (registry name, options)
    "preble[literal-window]": ("preble", {"load_horizon_s": 180.0}),  # W added unscaled
}
ADMISSION = {"preble": "preble", "d2lpm": "dlpm"}  # each policy with its own local order; else fcfs
Row = dict[str, Any]


def round_robin_prefill_s(
    reqs: list[WorkloadRequest], n: int, lat: LatencyModel, kv_tokens: int
) -> float:
    """Mean prefill time per request when request i goes to instance i mod n and each instance's
    prefix cache is an LRU of ``kv_tokens`` (timing, batching and in-flight blocks ignored)."""
    total = 0.0
    for k in range(n):
        lru: OrderedDict[int, None] = OrderedDict()
        for r in reqs[k::n]:
            hashes = r.chained_hashes()
            cached = 0
            while cached < len(hashes) and hashes[cached] in lru:
                cached += 1
            for h in reversed(hashes):
                lru[h] = None
                lru.move_to_end(h)
            while len(lru) * r.block_size > kv_tokens:
                lru.popitem(last=False)
            c = min(cached * r.block_size, r.input_len - 1)
            total += (lat.prefill[0] + lat.extend_work_ms(r.input_len - c, c)) / 1e3
    return total / len(reqs)


def cluster_for(
    n: int, policy: str, lat: LatencyModel, kv_tokens: int, mode: str, admission: str | None = None
) -> ClusterSpec:
    """``n`` colocated instances (Preble's data-parallel setting), or ``n`` prefill + ``n`` decode;
    each policy's own admission order (``ADMISSION``) unless ``admission`` names one for all."""
    order = admission or ADMISSION.get(policy, "fcfs")
    if mode == "colocated":
        spec = InstanceSpec(
            "colocated",
            latency=lat,
            kv_capacity_tokens=kv_tokens,
            admission=order,
            max_prefill_tokens=512,
        )
        return ClusterSpec.colocated(n, spec)
    prefill = InstanceSpec("prefill", latency=lat, kv_capacity_tokens=kv_tokens, admission=order)
    decode = InstanceSpec("decode", latency=lat, kv_capacity_tokens=kv_tokens)
    return ClusterSpec.disaggregated(n, n, prefill=prefill, decode=decode)


def row_of(result: Any, **labels: Any) -> Row:
    """Summary metrics; the per-client gap uses the service DLPM charges (uncached input +
    2 × output) and is None for single-client workloads."""
    s = result.summary()
    fair = result.fairness(uncached_only=True)
    many = fair.num_clients > 1
    return {
        **labels,
        **{k: round(v, 4) for k, v in s.items()},
        "service_gap": round(fair.service_gap, 1) if many else None,
        "relative_gap": round(fair.relative_gap, 4) if many else None,
        "jain": round(fair.jain_index, 4) if many else None,
    }


def run_routing(
    name: str,
    n: int,
    num_requests: int,
    load: float,
    seed: int,
    trace: str | None,
    mode: str,
    policies: list[str] = POLICIES,
    admission: str | None = None,
) -> list[Row]:
    lat, kv = opt13b_a100(), 66144
    if name == "mooncake":  # prompts up to 191k tokens: OPT-13B at TP=4 (KV for 356k tokens)
        lat, kv = LatencyModel.from_profile(tp=4), 356736
        reqs = make_workload("mooncake", path=trace, num_requests=num_requests)
    else:
        reqs = make_workload(name, num_requests=num_requests, seed=seed, block_size=64)
    rate = load * n / round_robin_prefill_s(reqs, n, lat, kv)
    if name == "mooncake":
        reqs = rescale_to_rate(reqs, rate)
    else:
        reqs = with_arrivals(reqs, poisson_arrivals(len(reqs), rate, seed=seed))
    rows = []
    for policy in policies:
        t0 = time.perf_counter()
        registry_name, options = VARIANTS.get(policy, (policy, {}))
        spec = cluster_for(n, registry_name, lat, kv, mode, admission)
        result = simulate(spec, reqs, make_policy(registry_name, **options))
        rows.append(
            row_of(
                result,
                part="routing",
                workload=name,
                instances=n,
                policy=policy,
                rate_rps=round(rate, 2),
                admission=admission or ADMISSION.get(registry_name, "fcfs"),
            )
        )
        rows[-1]["sim_s"] = round(time.perf_counter() - t0, 2)
        print_row(rows[-1])
    return rows


FAIRNESS_SETUPS = [  # (label, routing policy, instance admission order)
    ("VTC-like", "least_load", "vtc"),
    ("plain LPM", "cache_aware", "lpm"),
    ("Preble", "preble", "preble"),
    ("D2LPM", "d2lpm", "dlpm"),
]
FAIRNESS_MIX = {"heavy_request_share": 0.2, "light_suffix_len": 256, "output_len": 8}


def run_fairness(n: int, num_requests: int, overload: float, seed: int) -> list[Row]:
    """Every client backlogged: one heavy uncached client (20% of requests) and three light
    clients with cached prefixes, at ``overload`` × round-robin prefill capacity; 2n decode
    instances keep decode from being the bottleneck, so prefill admission decides service."""
    lat = opt13b_a100()
    reqs = make_workload(
        "fairness_mix", num_requests=num_requests, seed=seed, block_size=64, **FAIRNESS_MIX
    )
    rate = overload * n / round_robin_prefill_s(reqs, n, lat, 66144)
    reqs = with_arrivals(reqs, poisson_arrivals(len(reqs), rate, seed=seed))
    rows = []
    for label, policy, order in FAIRNESS_SETUPS:
        spec = ClusterSpec.disaggregated(n, 2 * n, prefill=InstanceSpec("prefill", admission=order))
        result = simulate(spec, reqs, make_policy(policy))
        row = row_of(
            result,
            part="fairness",
            workload="fairness_mix",
            instances=n,
            policy=f"{label} ({policy}+{order})",
            rate_rps=round(rate, 2),
        )
        vtc = result.fairness()
        row.update(
            vtc_service_gap=round(vtc.service_gap, 1),
            vtc_relative_gap=round(vtc.relative_gap, 4),
            vtc_jain=round(vtc.jain_index, 4),
        )
        for client in ("heavy", "light-1"):
            e2e = [r.e2e_s for r in result.records if r.client_id == client]
            row[f"avg_e2e_{client}_s"] = round(float(np.mean(e2e)), 3)
        rows.append(row)
        print_row(row)
    return rows


def decision_time(
    num_instances: int,
    num_prefixes: int,
    num_probes: int,
    seed: int,
    policies: tuple[str, ...] = ("round_robin", "cache_aware", "preble", "d2lpm"),
) -> list[Row]:
    """Route ``num_prefixes`` distinct 512-token prefixes (16-token blocks) over the instances,
    then time ``num_probes`` decisions for requests that reuse one of them or bring a new one.
    Wall time includes this shared machine's scheduling noise; CPU time (thread) excludes it."""
    loads = [
        InstanceLoad(f"p{i}", "prefill", free_kv_blocks=2000, total_kv_blocks=4134)
        for i in range(num_instances)
    ]
    out = []
    for policy_name in policies:
        rng = np.random.default_rng(seed)
        policy = make_policy(policy_name)
        wall_ns, cpu_ns = [], []
        for i in range(num_prefixes + num_probes):
            reuse = i >= num_prefixes and rng.random() < 0.5
            group = int(rng.integers(num_prefixes)) if reuse else i
            hashes = (*range(group * 1000, group * 1000 + 32), 10**9 + i)
            req = RouteRequest(f"r{i}", f"c{i % 8}", 33 * 16, hashes, 16, 64, i * 0.01)
            w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            policy.choose_prefill(req, loads, i * 0.01)
            w1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            policy.on_prefill_done(req.request_id, i * 0.01, 0.1)
            policy.on_finished(req.request_id, i * 0.01)
            if i >= num_prefixes:
                wall_ns.append(w1 - w0)
                cpu_ns.append(c1 - c0)
        wall, cpu = np.array(wall_ns) / 1e6, np.array(cpu_ns) / 1e6
        row = {
            "part": "decision_time",
            "policy": policy_name,
            "instances": num_instances,
            "cached_prefixes": num_prefixes,
            "p50_wall_ms": round(float(np.percentile(wall, 50)), 4),
            "p99_wall_ms": round(float(np.percentile(wall, 99)), 4),
            "p50_cpu_ms": round(float(np.percentile(cpu, 50)), 4),
            "p99_cpu_ms": round(float(np.percentile(cpu, 99)), 4),
        }
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def print_row(r: Row) -> None:
    print(
        f"{r['workload']:>13} N={r['instances']:<3} {r['policy']:<34} rate={r['rate_rps']:<7} "
        f"TTFT {r['avg_ttft_s']:.3f}/{r['p99_ttft_s']:.3f}  E2E {r['avg_e2e_s']:.3f}/{r['p99_e2e_s']:.3f}  "
        f"hit {r['prefix_hit_rate']:.2f}  imb {r['load_imbalance']:.2f}  gap {_fmt(r['relative_gap'])}  "
        f"jain {_fmt(r['jain'])}  thr {r['throughput_rps']:.1f}",
        flush=True,
    )


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routing = [r for r in rows if r["part"] == "routing"]
    keys = sorted({(r["workload"], r["instances"]) for r in routing})
    policies = list(dict.fromkeys(r["policy"] for r in routing))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.2 * len(keys)), 8))
    width = 0.8 / len(policies)
    for ax, metric in zip(axes, ("avg_e2e_s", "p99_e2e_s")):
        for j, policy in enumerate(policies):
            vals = [
                next(
                    r[metric]
                    for r in routing
                    if (r["workload"], r["instances"]) == k and r["policy"] == policy
                )
                for k in keys
            ]
            ax.bar(np.arange(len(keys)) + j * width, vals, width, label=policy)
        ax.set_xticks(
            np.arange(len(keys)) + 0.4 - width / 2, [f"{w}\nN={n}" for w, n in keys], fontsize=7
        )
        ax.set_yscale("log")
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[Row]) -> str:
    """The routing rows as a markdown table (one row per workload × size × policy), then the
    decision-time rows."""
    lines = [
        "| workload | N | policy | TTFT avg (s) | TTFT p99 (s) | E2E avg (s) | E2E p99 (s) | hit rate |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["part"] == "routing":
            lines.append(
                f"| {r['workload']} | {r['instances']} | {r['policy']} | {r['avg_ttft_s']:.3f} | "
                f"{r['p99_ttft_s']:.3f} | {r['avg_e2e_s']:.3f} | {r['p99_e2e_s']:.3f} | "
                f"{r['prefix_hit_rate']:.3f} |"
            )
    timing = [r for r in rows if r["part"] == "decision_time"]
    if timing:
        lines += [
            "",
            "| policy | instances | cached prefixes | p50 wall (ms) | p99 wall (ms) | p50 CPU (ms) | p99 CPU (ms) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in timing:
            lines.append(
                f"| {r['policy']} | {r['instances']} | {r['cached_prefixes']} | "
                f"{r['p50_wall_ms']:.4f} | {r['p99_wall_ms']:.4f} | {r['p50_cpu_ms']:.4f} | "
                f"{r['p99_cpu_ms']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer workloads and requests (minutes)")
    ap.add_argument("--trace", help="a Mooncake-format JSONL trace to add as a workload")
    ap.add_argument("--out", help="write all rows as JSON here")
    ap.add_argument("--plot", help="write a PNG of avg/p99 E2E per workload, size and policy")
    ap.add_argument("--markdown", help="write the routing and decision-time tables here")
    ap.add_argument(
        "--load",
        type=float,
        default=0.9,
        help="arrival rate as a share of round-robin's estimated prefill capacity",
    )
    ap.add_argument("--mode", choices=["disagg", "colocated"], default="disagg")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--admission",
        help="one prefill admission order for every routing policy (e.g. fcfs), to compare "
        "routing alone; default: each policy with its own (preble: preble, d2lpm: dlpm)",
    )
    ap.add_argument(
        "--parts",
        default="routing,fairness,decision",
        help="comma list of routing, fairness, decision",
    )
    ap.add_argument("--workloads", help="comma list of routing workloads (default: per --quick)")
    ap.add_argument(
        "--all-workloads",
        action="store_true",
        help="all five Preble-like workloads, and every size for each (also with --quick)",
    )
    ap.add_argument("--sizes", help="comma list of instance counts (default 4,16,64)")
    ap.add_argument("--policies", help=f"comma list (default {','.join(POLICIES)})")
    args = ap.parse_args(argv)

    parts = set(_csv(args.parts))
    all_workloads = ["tool_use", "agent", "programming", "video_qa", "long_doc_qa"]
    if args.workloads:
        workloads = _csv(args.workloads)
    elif args.quick and not args.all_workloads:
        workloads = ["tool_use", "agent", "video_qa"]
    else:
        workloads = all_workloads
    requests_at = {4: 2000, 16: 6000, 64: 16000} if args.quick else {4: 4000, 16: 12000, 64: 32000}
    sizes = [int(x) for x in _csv(args.sizes)] if args.sizes else [4, 16, 64]
    policies = _csv(args.policies) if args.policies else POLICIES
    if args.trace and "mooncake" not in workloads:
        workloads.append("mooncake")
    every_size = args.all_workloads or bool(args.workloads) or bool(args.sizes)
    rows: list[Row] = []
    t0 = time.perf_counter()
    if "routing" in parts:
        for name in workloads:
            for n in sizes:
                if args.quick and n == 64 and name != workloads[0] and not every_size:
                    continue
                num = requests_at.get(n, 250 * n)
                rows += run_routing(
                    name,
                    n,
                    min(num, 3993) if name == "mooncake" else num,
                    args.load,
                    args.seed,
                    args.trace,
                    args.mode,
                    policies,
                    args.admission,
                )
    if "fairness" in parts:
        for n in (2,) if args.quick else (2, 4):
            rows += run_fairness(n, 3000 if args.quick else 3000 * n, overload=3.0, seed=args.seed)
    if "decision" in parts:
        rows += decision_time(64, 10_000, 1000 if args.quick else 5000, args.seed)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows))


if __name__ == "__main__":
    main()
