"""How long ``distserve plan`` takes for 4 nodes × 8 GPUs (target: under 60 s).

OPT-13B and OPT-66B from DistServe's A100 profile, the ShareGPT-like workload, the chatbot SLOs
(0.2 s / 0.1 s for 13B, 0.4 s / 0.1 s for 66B: the earlier paper version), the default 1500
simulated requests, pp = 1 (what the engine runs) and pp ≤ 4, slow network (DistServe's
25 Gbit/s testbed) and fast network (200 Gbit/s assumed). Each case runs the whole command in
a fresh process and records wall time, CPU time (user + sys of the child) and the machine's
load average, since on a shared machine wall time is not the planner's alone.

    python benchmarks/placement_plan_time.py [--jobs 1] [--out results/placement_plan_time.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from placement.latency_model import DEFAULT_PROFILE_PATH

CASES = [
    ("opt-13b slow pp1", "facebook/opt-13b", "0.2", ["--network", "slow"]),
    ("opt-13b fast pp1", "facebook/opt-13b", "0.2", ["--network", "fast", "--inter-node-gbps", "200"]),
    ("opt-13b slow pp<=4", "facebook/opt-13b", "0.2", ["--network", "slow", "--max-pp", "4"]),
    ("opt-66b slow pp1", "facebook/opt-66b", "0.4", ["--network", "slow"]),
]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=str(DEFAULT_PROFILE_PATH))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="results/placement_plan_time.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, ttft, extra in CASES:
            out = Path(tmp) / f"{len(rows)}.yaml"
            cmd = [
                sys.executable, "-m", "distserve.cli", "plan", "--profile", args.profile,
                "--model-name", model, "--workload", "sharegpt-like", "--ttft-slo", ttft,
                "--tpot-slo", "0.1", "--gpus-per-node", "8", "--nodes", "4", "--out", str(out),
                "--jobs", str(args.jobs), "--disable-tqdm", *extra,
            ]  # fmt: skip
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            chosen = next((ln for ln in proc.stdout.splitlines() if ln.startswith("chosen")), "")
            if proc.returncode:
                chosen = "error: " + proc.stderr.strip().splitlines()[-1]
            rows.append({"case": name, "wall_s": wall, "cpu_s": cpu, "load_avg_1min": load,
                         "returncode": proc.returncode, "chosen": chosen.strip()})  # fmt: skip
            print(f"{name:<20} wall {wall:6.1f} s  cpu {cpu:6.1f} s  load {load:4.1f}  {chosen}")
    result = {"benchmark": "placement_plan_time", "date": time.strftime("%Y-%m-%d"),
              "machine": os.uname().nodename, "cpus": os.cpu_count(), "jobs": args.jobs,
              "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
