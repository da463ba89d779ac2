"""KV transfer inside served requests: its share of latency, and concurrent streams without leaks.

Starts a real cluster on this machine (router + 1 prefill + 1 decode instance, each pinned to its
own core, gloo KV transfer), sends N concurrent streaming requests through the gRPC SDK, and
reports: errors, client-side TTFT / TPOT / E2E, the KV bytes and seconds moved (from the router's
and instances' Prometheus metrics), the share of E2E latency spent in transfer, and whether every
KV block came back (free blocks == total on both instances afterwards).

    python benchmarks/served_transfer.py                       # small-100m model, 32 streams
    python benchmarks/served_transfer.py --quick               # tiny model, quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from distserve import envs
from distserve._proto import instance_pb2, instance_pb2_grpc
from distserve.client import AsyncClient
from distserve.launch.cluster_config import cluster_config_from_dict
from distserve.launch.local_cluster import LocalCluster
from distserve.model.tiny_model import make_tiny_model


def _model(preset: str) -> Path:
    path = envs.cache_dir() / f"bench-llama-{preset}"
    if not (path / "config.json").exists():
        make_tiny_model(path, arch="llama", preset=preset)
    return path


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    )


def _instances(router: str) -> list[instance_pb2.InstanceInfo]:
    with grpc.insecure_channel(router) as ch:
        stub = instance_pb2_grpc.RegistryStub(ch)
        return list(stub.ListInstances(instance_pb2.ListInstancesRequest(), timeout=10).instances)


def _free_blocks(address: str) -> tuple[int, int]:
    with grpc.insecure_channel(address) as ch:
        s = instance_pb2_grpc.InstanceStub(ch).GetStats(instance_pb2.StatsRequest(), timeout=10)
        return s.num_free_blocks, s.num_total_blocks


async def _load(endpoint: str, n: int, prompt_len: int, max_tokens: int) -> list[dict]:
    async with AsyncClient(endpoint, timeout_s=600) as client:

        async def one(i: int) -> dict:
            prompt = [(17 * i + 31 * j) % 400 + 10 for j in range(prompt_len)]
            try:
                out = await client.generate(
                    prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
                )
                return {"ok": True, "ttft_s": out.ttft_s, "tpot_s": out.tpot_s, "e2e_s": out.e2e_s}
            except Exception as exc:  # counted and reported, never hidden
                return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

        return await asyncio.gather(*(one(i) for i in range(n)))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small-100m", choices=["tiny", "small-100m"])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="tiny model, 32 short requests")
    parser.add_argument("--out", default="results/served_transfer.json")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.prompt_len, args.max_tokens = "tiny", 128, 16
    cores = sorted(os.sched_getaffinity(0))
    pin = [[cores[0]], [cores[-1]]]
    config = cluster_config_from_dict(
        {
            "model": str(_model(args.preset)),
            "device": "cpu",
            "router": {"grpc_port": 0, "http_port": 0},
            "prefill": {"instances": 1, "num_threads": 1, "cpu_cores": [pin[0]]},
            "decode": {"instances": 1, "num_threads": 1, "cpu_cores": [pin[1]], "max_num_seqs": 64},
            "kv_cache": {"block_size": 16, "cpu_memory_gib": 1.0},
            "transfer": {"backend": "gloo"},
        }
    )
    print(f"starting a 1 prefill + 1 decode cluster ({args.preset}) ...", flush=True)
    with LocalCluster(config, log_level="WARNING") as cluster:
        asyncio.run(_load(cluster.grpc_address, 2, args.prompt_len, 4))  # warm-up
        metrics = f"{cluster.http_url}/metrics"
        bytes0 = _metric(metrics, "distserve_kv_transfer_bytes_total")
        secs0 = _metric(metrics, "distserve_kv_transfer_seconds_total")
        start = time.monotonic()
        rows = asyncio.run(
            _load(cluster.grpc_address, args.num_requests, args.prompt_len, args.max_tokens)
        )
        wall_s = time.monotonic() - start
        moved = _metric(metrics, "distserve_kv_transfer_bytes_total") - bytes0
        transfer_s = _metric(metrics, "distserve_kv_transfer_seconds_total") - secs0
        deadline = time.monotonic() + 30
        while True:
            blocks = {
                i.descriptor.instance_id: _free_blocks(i.descriptor.address)
                for i in _instances(cluster.grpc_address)
            }
            if all(f == t for f, t in blocks.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    ok = [r for r in rows if r["ok"]]
    errors = [r["error"] for r in rows if not r["ok"]]
    e2e = [r["e2e_s"] for r in ok]
    result = {
        "config": vars(args),
        "date": time.strftime("%Y-%m-%d"),
        "load_avg": os.getloadavg(),
        "num_ok": len(ok),
        "errors": errors,
        "wall_s": wall_s,
        "mean_ttft_s": statistics.mean(r["ttft_s"] for r in ok) if ok else None,
        "mean_tpot_s": statistics.mean(r["tpot_s"] for r in ok if r["tpot_s"]) if ok else None,
        "mean_e2e_s": statistics.mean(e2e) if ok else None,
        "kv_bytes_per_request": moved / max(1, len(ok)),
        "transfer_s_per_request": transfer_s / max(1, len(ok)),
        "transfer_share_of_e2e": (transfer_s / max(1, len(ok))) / statistics.mean(e2e)
        if ok
        else None,
        "transfer_bandwidth_gb_s": moved / transfer_s / 1e9 if transfer_s else None,
        "blocks_after": {k: {"free": f, "total": t} for k, (f, t) in blocks.items()},
        "leaked_blocks": sum(t - f for f, t in blocks.values()),
    }
    print(f"\n{'requests ok':<28}{len(ok)}/{len(rows)}   errors: {len(errors)}")
    for key in (
        "mean_ttft_s",
        "mean_tpot_s",
        "mean_e2e_s",
        "kv_bytes_per_request",
        "transfer_s_per_request",
        "transfer_share_of_e2e",
        "transfer_bandwidth_gb_s",
        "leaked_blocks",
    ):
        value = result[key]
        print(f"{key:<28}{value:.4g}" if isinstance(value, float) else f"{key:<28}{value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if not errors and result["leaked_blocks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
