"""Reproduce DistServe's OPT-13B placement from its A100 profile, then show what our rules change.

Setting (DistServe README): OPT-13B, a ShareGPT-like chatbot workload, TTFT ≤ 0.2 s and TPOT ≤
0.1 s for 90% of requests (the earlier paper version's chatbot SLOs), one node of 4 A100s,
Poisson arrivals. ShareGPT itself cannot be downloaded here: the workload is our synthetic
``sharegpt-like`` shape (``placement/workload.py`` documents it), so absolute numbers differ.

Rows, each a search over (tp, pp ≤ --max-pp) units within the node:
  distserve      1:1 pairs, TTFT and TPOT attainment checked separately, no KV transfer time
  + joint        the same pairs judged by joint attainment (one request must meet both)
  + n:m          prefill:decode ratios other than 1:1 (units up to 6 instances)
  ours           + KV transfer time at the node's link (300 GB/s NVLink assumed)
  ours, slow     the same with a 25 Gbit/s link between the pools (as if they sat on
                 different nodes of DistServe's testbed)
and two colocated baselines: our chunked-prefill colocated engine on the same coefficients, and a
vLLM-like one (DistServe's vLLM-baseline profile, whole prompts batched with the running decodes:
token budget 16384, i.e. no chunking).
Also: the DistServe pair's joint attainment at its own goodput, and the sensitivity of the
DistServe-rules answer to the number of simulated requests (DistServe's README uses 300).

    python benchmarks/placement_reproduce.py [--quick] [--out results/placement_reproduce.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from placement.evaluate import SLO, Evaluator, SimSettings
from placement.latency_model import DEFAULT_PROFILE_PATH
from placement.profile_format import load_profile
from placement.search import (
    DISTSERVE_RULES,
    OUR_RULES,
    ClusterShape,
    Links,
    SearchRules,
    search_colocated,
    search_units,
)
from placement.workload import parse_workload

MODEL = "facebook/opt-13b"
SHAPE = ClusterShape(gpus_per_node=4, num_nodes=1)
ROWS: list[tuple[str, SearchRules, float | None]] = [
    ("distserve (1:1, separate P90, no transfer)", DISTSERVE_RULES, None),
    ("+ joint attainment", replace(DISTSERVE_RULES, joint=True), None),
    ("+ n:m ratios", replace(OUR_RULES, transfer=False), None),
    ("ours (+ KV transfer, 300 GB/s)", OUR_RULES, None),
    ("ours, 25 Gbit/s link", OUR_RULES, 25e9 / 8),
]


def run_row(ev: Evaluator, rules: SearchRules, bw: float, max_pp: int, jobs: int) -> Any:
    res = search_units(ev, SHAPE, Links(bw, bw), "fast", rules, max_pp, jobs=jobs)
    best = res.best
    at = ev.attainment(best.placement, best.rate_per_s)
    return res, {
        "unit": str(best.placement),
        "num_gpus": best.placement.num_gpus,
        "goodput_per_s": best.rate_per_s,
        "goodput_per_gpu": best.per_gpu,
        "at_goodput": {"joint": at.joint, "ttft": at.ttft, "tpot": at.tpot},
        "candidates": [(str(v.placement), v.per_gpu) for v in res.verified],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=str(DEFAULT_PROFILE_PATH))
    ap.add_argument("--num-requests", type=int, default=1500)
    ap.add_argument("--sensitivity", default="300,1500,4000", help="N for the DistServe rows")
    ap.add_argument("--max-pp", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="500 requests, no sensitivity sweep")
    ap.add_argument("--out", default="results/placement_reproduce.json")
    args = ap.parse_args()
    if args.quick:
        args.num_requests, args.sensitivity = 500, ""
    profile = load_profile(args.profile)
    node_link = profile.intra_node_bytes_per_s
    slo = SLO(0.2, 0.1, 0.9)
    model = profile.model(MODEL)

    def evaluator(n: int) -> Evaluator:
        workload = parse_workload("sharegpt-like", n, seed=0, max_model_len=2048)
        return Evaluator(model, workload, slo, SimSettings())

    t0 = time.perf_counter()
    rows, ours = [], None
    ev = evaluator(args.num_requests)
    for name, rules, link in ROWS:
        res, row = run_row(ev, rules, link or node_link, args.max_pp, args.jobs)
        rows.append({"rules": name, **row})
        print(f"{name:<44} {row['unit']:<24} {row['goodput_per_gpu']:.2f} req/s/GPU", flush=True)
        if rules is OUR_RULES and link is None:
            ours = res
    assert ours is not None
    g_p = {c.tp: g for c, g in ours.prefill_goodput.items() if c.pp == 1}
    g_d = {c.tp: g for (c, _), g in ours.decode_goodput.items() if c.pp == 1}
    bounds = {tp: min(g, g_d.get(tp, g)) for tp, g in g_p.items()}
    coloc = search_colocated(ev, SHAPE, OUR_RULES, bounds, jobs=args.jobs)
    colocated = None
    if coloc is not None:
        unit, budget = coloc
        colocated = {
            "unit": str(unit.placement),
            "token_budget": budget,
            "goodput_per_gpu": unit.per_gpu,
        }
        print(f"{'colocated (chunked prefill), joint':<44} {colocated['unit']:<24} "
              f"{unit.per_gpu:.2f} req/s/GPU (budget {budget})")  # fmt: skip
    vllm_path = Path(args.profile).with_name("distserve_a100_profile_vllm_baseline.json")
    vllm_like = None
    if vllm_path.exists():
        vllm_ev = replace(ev, model=load_profile(vllm_path).model(MODEL), num_simulations=0)
        found = search_colocated(vllm_ev, SHAPE, OUR_RULES, bounds, (16384,), jobs=args.jobs)
        if found is not None:
            vllm_like = {"unit": str(found[0].placement), "goodput_per_gpu": found[0].per_gpu}
            print(f"{'colocated vLLM-like (no chunking), joint':<44} {vllm_like['unit']:<24} "
                  f"{found[0].per_gpu:.2f} req/s/GPU")  # fmt: skip
    sensitivity = []
    for n in [int(x) for x in args.sensitivity.split(",") if x]:
        _, row = run_row(evaluator(n), DISTSERVE_RULES, node_link, args.max_pp, args.jobs)
        sensitivity.append({"num_requests": n, **row})
        print(f"distserve rules, N={n:<5} {row['unit']:<24} {row['goodput_per_gpu']:.2f} req/s/GPU")
    result = {
        "benchmark": "placement_reproduce",
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "setting": {
            "model": MODEL,
            "workload": "sharegpt-like (synthetic, see the docstring)",
            "workload_summary": ev.workload.summary(),
            "slo": vars(slo),
            "cluster": "1 node × 4 A100 (DistServe's profile)",
            "max_pp": args.max_pp,
            "num_requests": args.num_requests,
            "settings": vars(ev.settings),
        },
        "rows": rows,
        "colocated": colocated,
        "colocated_vllm_like": vllm_like,
        "sensitivity_distserve_rules": sensitivity,
        "elapsed_s": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"wrote {args.out} ({result['elapsed_s']:.0f} s)")
    return 0


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| rules | best unit | GPUs | goodput (req/s) | per GPU | joint / TTFT / TPOT attainment at it |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        a = r["at_goodput"]
        lines.append(
            f"| {r['rules']} | {r['unit']} | {r['num_gpus']} | {r['goodput_per_s']:.2f} | "
            f"**{r['goodput_per_gpu']:.2f}** | {a['joint']:.3f} / {a['ttft']:.3f} / {a['tpot']:.3f} |"
        )
    c = result["colocated"]
    if c:
        lines.append(f"| colocated, chunked prefill (budget {c['token_budget']}) | {c['unit']} | "
                     f"{c['unit'].split('(tp')[1][0]} | | **{c['goodput_per_gpu']:.2f}** | |")  # fmt: skip
    v = result["colocated_vllm_like"]
    if v:
        lines.append(f"| colocated, vLLM-like (vLLM profile, no chunking) | {v['unit']} | "
                     f"{v['unit'].split('(tp')[1][0]} | | **{v['goodput_per_gpu']:.2f}** | |")  # fmt: skip
    for s in result["sensitivity_distserve_rules"]:
        lines.append(
            f"| distserve rules, {s['num_requests']} requests | {s['unit']} | {s['num_gpus']} | "
            f"{s['goodput_per_s']:.2f} | {s['goodput_per_gpu']:.2f} | |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
