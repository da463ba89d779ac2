"""distserve against ``transformers serve --continuous-batching`` on the same two CPU cores.

Three systems serve the same random ``small-100m`` checkpoint (``distserve make-tiny-model OUT
--preset small-100m``), one after the other, each under ``taskset -c <the two cores>``:

    distserve-colocated   router + 1 colocated instance (2 threads, both cores)
    distserve-1p1d        router + 1 prefill instance on core A + 1 decode instance on core B
    transformers-serve    transformers serve MODEL --continuous-batching --device cpu

and each gets the same ``distserve bench`` load through its OpenAI ``/v1/completions`` endpoint:
the same text prompts (made with the model's tokenizer to ``--input-len`` tokens), the same
output length, greedy, the same Poisson arrivals at each of three rates. The table gives
throughput and TTFT/TPOT p50/p99 per system and rate; ``--out`` writes every bench report.

Output length is forced the same way on both servers: distserve gets ``ignore_eos``;
``transformers serve`` refuses that field (HTTP 422, "Unexpected fields"), so it gets
``generation_config = {"max_new_tokens": N, "min_new_tokens": N, "do_sample": false}``.
It also refuses token-id prompts, hence text prompts for everyone. It needs
``pip install "transformers[serving]"`` (accelerate) to load a model with ``--device cpu``.

    python benchmarks/vs_transformers_serve.py --out vs_transformers.json
    python benchmarks/vs_transformers_serve.py --rates 0.5,1,2 --num-prompts 40 --cores 0,1

The bench client runs outside the two cores when the machine has more; on a 2-core machine it
shares them (the JSON says which). Ratios from one run count; absolute times on a shared
machine do not (ARCHITECTURE.md §8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from distserve.bench.cli import add_bench_arguments, run_bench

SYSTEMS = ("distserve-colocated", "distserve-1p1d", "transformers-serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(path: Path) -> None:
    if (path / "config.json").exists():
        return
    cmd = ["distserve", "make-tiny-model", str(path), "--preset", "small-100m"]
    subprocess.run(cmd, check=True)


def cluster_yaml(
    model: Path, cores: list[int], disaggregated: bool, http_port: int, colocated_threads: int = 0
) -> dict:
    """A ``distserve serve`` config: colocated on both cores, or prefill/decode one core each."""
    config: dict[str, Any] = {
        "model": str(model),
        "device": "cpu",
        "router": {"host": "127.0.0.1", "grpc_port": 0, "http_port": http_port},
        "kv_cache": {"block_size": 16, "cpu_memory_gib": 1.0, "enable_prefix_caching": True},
    }
    if disaggregated:
        config["prefill"] = {"instances": 1, "num_threads": 1, "cpu_cores": [[cores[0]]]}
        config["decode"] = {"instances": 1, "num_threads": 1, "cpu_cores": [[cores[1]]]}
        config["transfer"] = {"backend": "gloo"}
    else:
        threads = colocated_threads or len(cores)
        config["colocated"] = {"instances": 1, "num_threads": threads, "cpu_cores": [cores]}
    return config


def server_command(
    system: str, model: Path, cores: list[int], port: int, work: Path, colocated_threads: int = 0
) -> list[str]:
    pin = ["taskset", "-c", ",".join(map(str, cores))]
    if system == "transformers-serve":
        return [
            *pin,
            "transformers",
            "serve",
            str(model),
            "--continuous-batching",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    config_path = work / f"{system}.yaml"
    config = cluster_yaml(model, cores, system == "distserve-1p1d", port, colocated_threads)
    config_path.write_text(yaml.safe_dump(config))
    return [
        *pin,
        "distserve",
        "--log-level",
        "WARNING",
        "serve",
        "--config",
        str(config_path),
        "--log-dir",
        str(work / f"{system}-logs"),
    ]


def wait_ready(url: str, model: str | None, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until one tiny completion succeeds (the model is loaded and every instance registered)."""
    body: dict[str, Any] = {"prompt": "hello", "max_tokens": 1}
    if model is not None:
        body["model"] = model
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{url} was not ready within {timeout_s:g} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server; if it hangs, kill its whole process group (started for it alone)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # both servers shut down their workers on Ctrl-C
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def bench_args(args: argparse.Namespace, system: str, url: str, out: Path) -> argparse.Namespace:
    argv = [
        "--endpoint",
        url,
        "--dataset",
        "random",
        "--num-prompts",
        str(args.num_prompts),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--rates",
        args.rates,
        "--seed",
        str(args.seed),
        "--prompt-as-text",
        "--tokenizer",
        str(args.model),
        "--warmup-requests",
        "2",
        "--ttft-slo",
        str(args.ttft_slo),
        "--tpot-slo",
        str(args.tpot_slo),
        "--out",
        str(out),
    ]
    if system == "transformers-serve":
        generation = {
            "max_new_tokens": args.output_len,
            "min_new_tokens": args.output_len,
            "do_sample": False,
        }
        argv += [
            "--model",
            str(args.model),
            "--no-ignore-eos",
            "--extra-body",
            json.dumps({"generation_config": json.dumps(generation)}),
        ]
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(argv)


def run_system(args: argparse.Namespace, system: str, work: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = server_command(system, args.model, args.cores, port, work, args.colocated_threads)
    print(f"\n== {system}: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(len(args.cores))}
    with open(work / f"{system}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            model = str(args.model) if system == "transformers-serve" else None
            wait_ready(url, model, proc, args.start_timeout)
            out = work / f"{system}.json"
            code = run_bench(bench_args(args, system, url, out))
            if code != 0:
                print(f"{system}: distserve bench exited with {code}", file=sys.stderr)
            return json.loads(out.read_text()) if out.exists() else {"error": f"bench exit {code}"}
        except RuntimeError as e:
            print(f"{system}: {e} (log: {work / f'{system}.log'})", file=sys.stderr)
            return {"error": str(e)}
        finally:
            stop(proc)


def table(reports: dict[str, dict[str, Any]]) -> str:
    rows = [
        f"{'system':<20} {'rate/s':>6} {'done':>5} {'err':>4} {'req/s':>6} {'tok/s':>7} "
        f"{'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>8}   (ms)"
    ]
    for system, report in reports.items():
        if "error" in report:
            rows.append(f"{system:<20} failed: {report['error']}")
            continue
        for r in report["results"]:
            ms = {
                k: {q: (v * 1000 if v is not None else float("nan")) for q, v in r[k].items()}
                for k in ("ttft_s", "tpot_s")
            }
            rows.append(
                f"{system:<20} {r['rate_per_s']:>6} {r['num_completed']:>5} {r['num_errors']:>4} "
                f"{r['request_throughput']:>6.2f} {r['output_throughput']:>7.1f} "
                f"{ms['ttft_s']['median']:>9.1f} {ms['ttft_s']['p99']:>8.1f} "
                f"{ms['tpot_s']['median']:>9.1f} {ms['tpot_s']['p99']:>8.1f}"
            )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model", type=Path, default=Path(tempfile.gettempdir()) / "distserve-small-100m"
    )
    p.add_argument("--cores", default="0,1", help="the two cores every server gets")
    p.add_argument("--rates", default="0.5,1,2", help="three request rates (req/s)")
    p.add_argument("--num-prompts", type=int, default=30)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--ttft-slo", type=float, default=2.0)
    p.add_argument("--tpot-slo", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--colocated-threads",
        type=int,
        default=1,
        help="torch threads of the colocated instance (0: one per core; on cores shared with "
        "the router and the load generator one thread serves more, docs/benchmarks.md)",
    )
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=Path("vs_transformers_serve.json"))
    args = p.parse_args()
    args.cores = [int(c) for c in args.cores.split(",")]
    if len(args.cores) != 2:
        p.error("--cores needs exactly two cores")
    make_model(args.model)
    others = sorted(set(os.sched_getaffinity(0)) - set(args.cores))
    if others:  # keep the load generator off the servers' cores
        os.sched_setaffinity(0, others)
    reports: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vs-transformers-") as tmp:
        for system in args.systems.split(","):
            reports[system] = run_system(args, system, Path(tmp))
    print("\n" + table(reports))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "server_cores": args.cores,
            "client_cores": others or args.cores,
        },
        "model": str(args.model),
        "command": " ".join(sys.argv),
        "systems": reports,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
