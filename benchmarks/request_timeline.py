"""Where a request's time to first token goes: one cluster, ``distserve bench`` load, and the
per-request timelines of every process (``distserve/timeline.py``) merged hop by hop.

Starts the cluster of ``--cluster`` (a cluster YAML; e.g. the ``disaggregated.yaml`` that
``placement_validate.py`` writes) with ``DISTSERVE_TIMELINE`` set, runs one ``distserve bench``
per rate, and prints per rate the median and p90 of each hop between consecutive events:

    client.send → router.recv → router.prefill_sent → instance.recv → engine.admitted
      → engine.scheduled → engine.first_token → instance.answered → router.prefill_done
      → router.first_out → client.first

(a colocated cluster's first token comes back on the token stream: its last hops are
``engine.first_token → client.first``). ``engine.admitted → engine.scheduled`` is the queue the
simulator models, ``engine.scheduled → engine.first_token`` the step; everything else is a hop
between processes or threads that the simulator does not see.

    python benchmarks/request_timeline.py --cluster /tmp/pv10/disaggregated.yaml --rates 9,20 \
        [--input-len 256 --output-len 32 --num-prompts 80] [--out results/request_timeline.json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from distserve import timeline

EVENTS = (
    "client.send",
    "router.recv",
    "router.prefill_sent",
    "instance.recv",
    "engine.admitted",
    "engine.scheduled",
    "engine.first_token",
    "instance.answered",
    "router.prefill_done",
    "router.first_out",
    "client.first",
)


def first_events(timelines: dict[int, timeline.ProcessTimeline]) -> dict[str, dict[str, float]]:
    """request id → event → the first time any process recorded it."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for proc in timelines.values():
        for t, rid, event in proc.events:
            seen = out[rid]
            if event not in seen or t < seen[event]:
                seen[event] = t
    return out


def prefill_steps(
    timelines: dict[int, timeline.ProcessTimeline], t0: float, t1: float, latency: Any
) -> dict[str, float]:
    """The steps in [t0, t1] that only prefill (every request computes > 1 token): measured
    duration against the profile's prediction for the same prompts."""
    rows = [
        s
        for proc in timelines.values()
        for s in proc.steps
        if t0 <= s.start_s <= t1 and min(s.new_tokens) > 1
    ]
    if not rows:
        return {}
    measured = np.array([(s.end_s - s.start_s) * 1e3 for s in rows])
    out = {
        "num_steps": len(rows),
        "prompts_per_step_mean": float(np.mean([len(s.new_tokens) for s in rows])),
        "measured_p50_ms": float(np.median(measured)),
        "measured_mean_ms": float(measured.mean()),
    }
    if latency is not None:
        predicted = np.array([latency.prefill_ms(s.new_tokens) for s in rows])
        out["predicted_p50_ms"] = float(np.median(predicted))
        out["predicted_mean_ms"] = float(predicted.mean())
        ratio = measured / predicted
        out["ratio_p50"] = float(np.median(ratio))
        sizes = np.array([len(s.new_tokens) for s in rows])
        for label, pick in (("1", sizes == 1), ("2", sizes == 2), ("3+", sizes >= 3)):
            if pick.any():  # larger batches come with bursts, when every process is busier
                out[f"ratio_p50_{label}_prompts"] = float(np.median(ratio[pick]))
                out[f"num_steps_{label}_prompts"] = int(pick.sum())
    return out


def hops(timelines: dict[str, dict[str, float]], rids: set[str]) -> dict[str, dict[str, float]]:
    """Per hop between consecutive events present in a request: p50/p90 in ms, and count."""
    per_hop: dict[str, list[float]] = defaultdict(list)
    for rid in rids:
        ev = timelines.get(rid, {})
        present = [e for e in EVENTS if e in ev]
        for a, b in itertools.pairwise(present):
            per_hop[f"{a} → {b}"].append((ev[b] - ev[a]) * 1e3)
        if "client.send" in ev and "client.first" in ev:
            per_hop["TTFT (client)"].append((ev["client.first"] - ev["client.send"]) * 1e3)
    order = {f"{a} → {b}": i for i, (a, b) in enumerate(itertools.pairwise(EVENTS))}
    rows = {}
    for hop in sorted(per_hop, key=lambda h: order.get(h, 99)):
        xs = np.array(per_hop[hop])
        rows[hop] = {
            "p50_ms": float(np.median(xs)),
            "p90_ms": float(np.percentile(xs, 90)),
            "mean_ms": float(xs.mean()),
            "n": len(xs),
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cluster", required=True, help="cluster YAML")
    ap.add_argument("--rates", default="9,20", help="comma-separated requests/s")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--range-ratio", type=float, default=0.5)
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--warmup-requests", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", help="a profile.json: compare prefill steps with its model")
    ap.add_argument("--model-name", default="validate", help="the profile's model entry")
    ap.add_argument("--keep", help="write the timelines to this folder and keep them")
    ap.add_argument("--out", default="results/request_timeline.json")
    args = ap.parse_args()

    from distserve.launch.cluster_config import cluster_config_from_dict
    from distserve.launch.local_cluster import LocalCluster

    data = yaml.safe_load(Path(args.cluster).read_text())
    data["router"].update(grpc_port=0, http_port=None)
    config = cluster_config_from_dict(data)
    rates = [float(r) for r in args.rates.split(",")]
    latency = None
    if args.profile:
        from placement.profile_format import load_profile

        latency = load_profile(Path(args.profile)).model(args.model_name).latency(1)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        tmp = args.keep or stack.enter_context(tempfile.TemporaryDirectory(prefix="timeline-"))
        directory = Path(tmp)
        os.environ["DISTSERVE_TIMELINE"] = tmp  # the cluster's processes and the bench inherit it
        with LocalCluster(config, log_dir=directory / "logs", log_level="WARNING") as cluster:
            for i, rate in enumerate(rates):
                out = directory / f"bench_{rate}.json"
                cmd = [
                    sys.executable, "-m", "distserve.cli", "bench",
                    "--endpoint", f"grpc://{cluster.grpc_address}", "--dataset", "random",
                    "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                    "--range-ratio", str(args.range_ratio), "--num-prompts", str(args.num_prompts),
                    "--rates", str(rate), "--seed", str(args.seed + i),
                    "--warmup-requests", str(args.warmup_requests if i == 0 else 0),
                    "--disable-tqdm", "--out", str(out),
                ]  # fmt: skip
                t0 = time.monotonic()
                client = subprocess.Popen(cmd)
                if client.wait() != 0:
                    raise SystemExit(f"distserve bench failed (exit {client.returncode})")
                timelines = timeline.read(directory)
                bench = timelines.get(client.pid)  # the requests this bench process sent
                rids = {rid for _, rid, _ in bench.events} if bench else set()
                report = json.loads(out.read_text())["results"][0]
                results[str(rate)] = {
                    "hops": hops(first_events(timelines), rids),
                    "prefill_steps": prefill_steps(timelines, t0, time.monotonic(), latency),
                    "bench_ttft_p50_ms": 1e3 * report["ttft_s"]["median"],
                }
        del os.environ["DISTSERVE_TIMELINE"]

    for rate, r in results.items():
        print(f"\nrate {rate} req/s (bench TTFT p50 {r['bench_ttft_p50_ms']:.1f} ms)")
        print(f"{'hop':<48} {'p50 ms':>8} {'p90 ms':>8} {'mean':>8} {'n':>5}")
        for hop, h in r["hops"].items():
            print(
                f"{hop:<48} {h['p50_ms']:8.2f} {h['p90_ms']:8.2f} {h['mean_ms']:8.2f} {h['n']:5d}"
            )
        if r["prefill_steps"]:
            print("prefill steps:", {k: round(v, 2) for k, v in r["prefill_steps"].items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"benchmark": "request_timeline", "args": vars(args), "rates": results}, indent=1
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
