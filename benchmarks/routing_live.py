"""Prefix-aware routing on a real cluster: preble vs round_robin (and cache_aware), same load.

For each policy a fresh cluster starts on this machine: a router, two prefill instances pinned to
one core each, one decode instance. Each prefill instance's KV pool holds only about half of the
workload's distinct prefixes, so a policy that spreads a prefix group over both instances makes
them recompute (and evict) prefixes, while a prefix-aware one keeps each group on one instance.
The same seeded `distserve bench` shared-prefix load runs against each; the table compares TTFT
and end-to-end latency (mean, p99) and the prefill instances' prefix-cache hit rates.

    python benchmarks/routing_live.py               # small-100m model (minutes per policy)
    python benchmarks/routing_live.py --quick       # tiny model, shorter load
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from distserve import envs
from distserve._proto import instance_pb2, instance_pb2_grpc
from distserve.launch.cluster_config import cluster_config_from_dict
from distserve.launch.local_cluster import LocalCluster
from distserve.model.tiny_model import make_tiny_model


def _model(preset: str) -> Path:
    path = envs.cache_dir() / f"bench-llama-{preset}"
    if not (path / "config.json").exists():
        make_tiny_model(path, arch="llama", preset=preset)
    return path


def _hit_rates(router: str) -> dict[str, float]:
    with grpc.insecure_channel(router) as ch:
        infos = instance_pb2_grpc.RegistryStub(ch).ListInstances(
            instance_pb2.ListInstancesRequest(), timeout=10
        )
    rates = {}
    for info in infos.instances:
        if info.descriptor.role == "prefill":
            with grpc.insecure_channel(info.descriptor.address) as ch:
                stats = instance_pb2_grpc.InstanceStub(ch).GetStats(
                    instance_pb2.StatsRequest(), timeout=10
                )
            rates[info.descriptor.instance_id] = stats.prefix_hit_rate
    return rates


def run_policy(policy: str, args: argparse.Namespace, model: Path, workdir: Path) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    config = cluster_config_from_dict(
        {
            "model": str(model),
            "device": "cpu",
            "router": {"grpc_port": 0, "http_port": None, "policy": policy},
            "prefill": {
                "instances": 2,
                "num_threads": 1,
                "cpu_cores": [[cores[0]], [cores[-1]]],
                "max_num_batched_tokens": 1024,
            },
            "decode": {
                "instances": 1,
                "num_threads": 1,
                "cpu_cores": [[cores[-1]]],
                "max_num_seqs": 64,
            },
            "kv_cache": {"block_size": 16, "num_blocks": args.blocks_per_instance},
        }
    )
    out = workdir / f"{policy}.json"
    with LocalCluster(config, log_level="WARNING") as cluster:
        cmd = [
            sys.executable, "-m", "distserve.cli", "bench",
            "--endpoint", f"grpc://{cluster.grpc_address}",
            "--dataset", "shared-prefix",
            "--num-prompts", str(args.num_prompts),
            "--input-len", str(args.input_len),
            "--prefix-len", str(args.prefix_len),
            "--num-prefix-groups", str(args.groups),
            "--output-len", str(args.output_len),
            "--rate", str(args.rate),
            "--seed", str(args.seed),
            "--warmup-requests", "0",
            "--disable-tqdm",
            "--out", str(out),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        hit_rates = _hit_rates(cluster.grpc_address)
    result = json.loads(out.read_text())["results"][0]
    return {
        "policy": policy,
        "ttft_mean_s": result["ttft_s"]["mean"],
        "ttft_p99_s": result["ttft_s"]["p99"],
        "e2e_mean_s": result["e2e_s"]["mean"],
        "e2e_p99_s": result["e2e_s"]["p99"],
        "num_completed": result["num_completed"],
        "num_errors": result["num_errors"],
        "prefill_hit_rates": hit_rates,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policies", default="round_robin,preble,cache_aware")
    parser.add_argument("--preset", default="small-100m", choices=["tiny", "small-100m"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--prefix-len", type=int, default=448)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1.5)
    parser.add_argument(
        "--blocks-per-instance", type=int, default=160, help="KV blocks of 16 tokens per instance"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/routing_live.json")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.num_prompts, args.rate = "tiny", 32, 8.0
    model = _model(args.preset)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies.split(","):
            print(f"running {policy} ...", flush=True)
            rows.append(run_policy(policy, args, model, Path(tmp)))
    base = rows[0]
    print(
        f"\n{'policy':<14}{'TTFT mean':>11}{'TTFT p99':>11}{'E2E mean':>11}{'E2E p99':>11}{'hit rates':>22}  vs {base['policy']} (mean/p99 E2E)"
    )
    for r in rows:
        hits = " ".join(f"{v:.2f}" for v in r["prefill_hit_rates"].values())
        ratio = f"{base['e2e_mean_s'] / r['e2e_mean_s']:.2f}x / {base['e2e_p99_s'] / r['e2e_p99_s']:.2f}x"
        print(
            f"{r['policy']:<14}{r['ttft_mean_s']:>11.3f}{r['ttft_p99_s']:>11.3f}{r['e2e_mean_s']:>11.3f}{r['e2e_p99_s']:>11.3f}{hits:>22}  {ratio}"
        )
    payload = {
        "config": vars(args),
        "date": time.strftime("%Y-%m-%d"),
        "load_avg": os.getloadavg(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
