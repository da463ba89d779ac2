"""Routed requests per second through the live router, with simulated instances behind it.

Issue 4's target: >= 1,000 routed requests/s. For each cluster shape and routing policy a fresh
router process starts (``distserve router``, exactly as deployed) and a process of simulated
instances registers with it (``distserve.instance.simulated``: real gRPC peers that answer at
once, without a model). A load generator process then drives the router's public
``Generation.Generate`` stream with text prompts (shared prefixes, so the prefix-aware policies
have something to do) and short outputs:

    load generator ──Generate──▶ router ──Prefill──▶ sim prefill ◀──PullKV── sim decode
     (closed loop)                      ──Decode (stream)─────────────────▶ sim decode

Per policy it reports:
  * throughput: closed loop with ``--concurrency`` requests in flight for ``--duration`` s
    (after a warm-up): routed req/s, p50/p99 end-to-end latency at that load, errors; and the
    CPU share each process used meanwhile (router near 100% of its core = the router is the
    bottleneck);
  * router-added latency: one request at a time, p50/p99 through the router minus the same
    requests sent by the load generator straight to the simulated instances (Prefill + Decode,
    what the router itself does), measured in the same run.

Processes are pinned with ``taskset``: by default the router gets the first allowed core alone
and the simulated instances and the load generator share the rest (on a 2-core machine: router
on core 0, everything else on core 1). ``--router-src DIR`` (repeatable, ``label=DIR``) runs the
router from another source tree, e.g. the commit before a speed-up, side by side in one run.

    python benchmarks/router_throughput.py                 # all policies, 2P+2D and 2 colocated
    python benchmarks/router_throughput.py --quick         # shorter, 2P+2D only
    python benchmarks/router_throughput.py --router-src before=/tmp/old --router-src after=.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from distserve import envs
from distserve._proto import generation_pb2, generation_pb2_grpc, instance_pb2, instance_pb2_grpc

POLICIES = ("round_robin", "least_load", "cache_aware", "preble", "d2lpm")
SETUPS = {"2p2d": (2, 2, 0), "2c": (0, 0, 2)}  # name -> (prefill, decode, colocated)
REPO = Path(__file__).resolve().parent.parent


# ---- workload -------------------------------------------------------------------------------
def prompts(num_groups: int = 32, per_group: int = 16) -> list[str]:
    """Text prompts in prefix groups: a ~100-character shared prefix + a short unique tail."""
    words = [
        "alpha",
        "bravo",
        "charlie",
        "delta",
        "echo",
        "foxtrot",
        "golf",
        "hotel",
        "india",
        "juliet",
        "kilo",
        "lima",
    ]
    out = []
    for g in range(num_groups):
        prefix = " ".join(words[(g + k) % len(words)] for k in range(14)) + f" group {g}."
        out.extend(f"{prefix} Question {q}: what comes next?" for q in range(per_group))
    order = sorted(range(len(out)), key=lambda i: (i * 7919) % len(out))  # interleave groups
    return [out[i] for i in order]


# ---- load generator (its own process) -------------------------------------------------------
def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (and its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _closed_loop(call, concurrency: int, warmup_s: float, duration_s: float, pids: dict):
    """``concurrency`` workers calling ``call(i)`` back to back; stats of the measured window."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + duration_s)
    cpu_before: dict[str, float] = {}

    async def worker(w: int) -> None:
        i = w
        while (t0 := time.perf_counter()) < window[1]:
            try:
                await call(i)
                ok = True
            except (grpc.aio.AioRpcError, RuntimeError) as exc:
                ok = False
                key = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                errors[key] = errors.get(key, 0) + 1
            t1 = time.perf_counter()
            if ok and window[0] <= t1 <= window[1]:
                latencies.append(t1 - t0)
            i += concurrency

    async def sample_cpu() -> None:
        await asyncio.sleep(warmup_s)
        cpu_before.update({name: _cpu_s(pid) for name, pid in pids.items()})

    sampler = asyncio.ensure_future(sample_cpu())
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    await sampler
    cpu_util = {
        name: round((_cpu_s(pid) - cpu_before[name]) / duration_s, 3) for name, pid in pids.items()
    }
    rate = len(latencies) / duration_s
    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "num_completed": len(latencies),
        "req_per_s": round(len(latencies) / duration_s, 1),
        "p50_ms": _ms(_percentile(latencies, 0.50)),
        "p99_ms": _ms(_percentile(latencies, 0.99)),
        "mean_ms": _ms(statistics.fmean(latencies) if latencies else None),
        "errors": errors,
        "cpu_util": cpu_util,  # CPU seconds per second (1.0 = one core busy)
        # CPU milliseconds each process spent per routed request, and the rate one fully busy
        # core would sustain at that cost (the machine is shared: the share we got varies)
        "cpu_ms_per_req": {
            k: round(v * 1e3 / rate, 3) if rate else None for k, v in cpu_util.items()
        },
        "req_per_s_per_core": {k: round(rate / v, 1) if v else None for k, v in cpu_util.items()},
    }


async def _one_at_a_time(call, num_requests: int) -> dict:
    latencies = []
    for i in range(num_requests):
        t0 = time.perf_counter()
        await call(i)
        latencies.append(time.perf_counter() - t0)
    return {
        "num_requests": num_requests,
        "p50_ms": _ms(_percentile(latencies, 0.50)),
        "p99_ms": _ms(_percentile(latencies, 0.99)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


class _Caller:
    """Requests through the router (``via_router``) or straight to the simulated instances."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.texts = prompts()
        self.channels = [grpc.aio.insecure_channel(args.target) for _ in range(args.channels)]
        self.stubs = [generation_pb2_grpc.GenerationStub(c) for c in self.channels]
        sampling = generation_pb2.SamplingOptions(
            max_tokens=args.max_tokens, temperature=0, ignore_eos=True
        )
        self.sampling = sampling
        self.direct: dict[str, list] = {}
        if args.instances:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.model)
            self.ids = [tok.encode(t, add_special_tokens=False) for t in self.texts]
            for instance_id, address in json.loads(Path(args.instances).read_text()).items():
                channel = grpc.aio.insecure_channel(address)
                self.channels.append(channel)
                role = instance_id.split("-")[1]
                self.direct.setdefault(role, []).append(instance_pb2_grpc.InstanceStub(channel))

    async def via_router(self, i: int) -> None:
        request = generation_pb2.GenerateRequest(
            text=self.texts[i % len(self.texts)], sampling=self.sampling, client_id=f"c{i % 8}"
        )
        finish = ""
        async for msg in self.stubs[i % len(self.stubs)].Generate(request, timeout=30):
            finish = msg.finish_reason or finish
        if not finish:
            raise RuntimeError("stream ended without a finish reason")

    async def direct_call(self, i: int) -> None:
        """What the router does for one request, minus the router: Prefill + Decode, or Generate."""
        request = instance_pb2.EngineRequest(
            request_id=f"direct-{i}-{time.monotonic_ns()}",
            client_id=f"c{i % 8}",
            prompt_token_ids=self.ids[i % len(self.ids)],
            sampling=self.sampling,
        )
        if "colocated" in self.direct:
            stubs = self.direct["colocated"]
            async for _ in stubs[i % len(stubs)].Generate(request, timeout=30):
                pass
            return
        prefill = self.direct["prefill"][i % len(self.direct["prefill"])]
        first = await prefill.Prefill(request, timeout=30)
        if first.finish_reason:
            return
        decode = self.direct["decode"][i % len(self.direct["decode"])]
        decode_request = instance_pb2.DecodeRequest(
            request=request, first_token_id=first.first_token_id, kv=first.kv
        )
        async for _ in decode.Decode(decode_request, timeout=30):
            pass

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def _loadgen(args: argparse.Namespace) -> dict:
    caller = _Caller(args)
    pids = {k: int(v) for k, v in (p.split("=") for p in args.pids.split(",") if p)}
    pids["loadgen"] = os.getpid()
    call = caller.direct_call if args.instances else caller.via_router
    try:
        for i in range(20):  # connections up, caches warm
            await call(i)
        result = {
            "throughput": await _closed_loop(
                call, args.concurrency, args.warmup, args.duration, pids
            ),
            "one_at_a_time": await _one_at_a_time(call, args.num_sequential),
        }
    finally:
        await caller.close()
    return result


# ---- orchestration --------------------------------------------------------------------------
def _model() -> Path:
    from distserve.model.tiny_model import make_tiny_model

    path = envs.cache_dir() / "bench-llama-tiny"
    if not (path / "config.json").exists():
        make_tiny_model(path, arch="llama", preset="tiny")
    return path


def _spawn(cmd: list[str], cores: str, log: Path, pythonpath: str | None = None):
    env = os.environ.copy()
    env["PYTHONUNBUFFERED"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with log.open("wb") as f:
        return subprocess.Popen(
            ["taskset", "-c", cores, *cmd],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _die_with_parent() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(OSError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_file(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{log.stem} exited early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {path}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return json.loads(path.read_text())


def _wait_registered(router: str, num: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(router) as channel:
        stub = instance_pb2_grpc.RegistryStub(channel)
        while time.monotonic() < deadline:
            infos = stub.ListInstances(instance_pb2.ListInstancesRequest(), timeout=5)
            if len(infos.instances) == num:
                return
            time.sleep(0.1)
    raise RuntimeError(f"the router never saw {num} instances")


def run_one(
    args: argparse.Namespace, model: Path, workdir: Path, setup: str, policy: str, src: str | None
) -> dict:
    from distserve.launch.cluster_config import cluster_config_from_dict

    num_prefill, num_decode, num_colocated = SETUPS[setup]
    config = cluster_config_from_dict(
        {
            "model": str(model),
            "device": "cpu",
            "router": {"grpc_port": 0, "http_port": None, "policy": policy},
            "prefill": {"instances": num_prefill},
            "decode": {"instances": num_decode},
            "colocated": {"instances": num_colocated},
        }
    )
    tag = f"{setup}-{policy}-{Path(src).name if src else 'cwd'}"
    config_path = workdir / f"{tag}.yaml"
    config_path.write_text(config.to_yaml())
    router_ready, sims_ready = workdir / f"{tag}.router.json", workdir / f"{tag}.sims.json"
    router_log, sims_log = workdir / f"{tag}.router.log", workdir / f"{tag}.sims.log"
    router = sims = None
    try:
        router = _spawn(
            [sys.executable, "-m", "distserve.cli", "--log-level", "WARNING", "router"]
            + ["--config", str(config_path), "--ready-file", str(router_ready)],
            args.router_cores,
            router_log,
            pythonpath=src,
        )
        address = _wait_file(router_ready, router, router_log)["grpc"]
        sims = _spawn(
            [sys.executable, "-m", "distserve.instance.simulated", "--router", address]
            + ["--model", str(model), "--ready-file", str(sims_ready)]
            + ["--prefill", str(num_prefill), "--decode", str(num_decode)]
            + ["--colocated", str(num_colocated)]
            + (["--no-pull-kv"] if args.no_pull_kv else []),
            args.instance_cores,
            sims_log,
        )
        _wait_file(sims_ready, sims, sims_log)
        _wait_registered(address, num_prefill + num_decode + num_colocated)
        time.sleep(1.0)  # a heartbeat or two: loads are known
        pids = f"router={router.pid},instances={sims.pid}"
        result = {"via_router": _run_loadgen(args, model, workdir, address, pids, None)}
        if args.direct:
            result["direct"] = _run_loadgen(args, model, workdir, address, pids, sims_ready)
        if router.poll() is not None:
            raise RuntimeError(f"router died:\n{router_log.read_text()[-3000:]}")
        return result
    finally:
        _stop(sims)
        _stop(router)


def _run_loadgen(args, model, workdir: Path, target: str, pids: str, instances: Path | None):
    out = workdir / "loadgen.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--loadgen", "--target", target, "--pids", pids]
    cmd += ["--model", str(model), "--out", str(out), "--max-tokens", str(args.max_tokens)]
    cmd += ["--concurrency", str(args.concurrency), "--channels", str(args.channels)]
    cmd += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    cmd += ["--num-sequential", str(args.num_sequential)]
    if instances is not None:
        cmd += ["--instances", str(instances)]
    log = workdir / "loadgen.log"
    proc = _spawn(cmd, args.loadgen_cores, log)
    try:
        proc.wait(args.duration + args.warmup + 300)
    finally:
        _stop(proc)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"load generator failed:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def _table(rows: list[dict]) -> str:
    head = (
        f"{'router':<8} {'setup':<5} {'policy':<12} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'rtr cpu':>7} {'sim cpu':>7} {'gen cpu':>7} {'rtr ms/req':>10} "
        f"{'req/s/core':>10} "
        f"{'1-by-1 p50':>10} {'p99':>6} {'added p50':>9} {'p99':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['router']:<8} {r['setup']:<5} {r['policy']:<12} FAILED: {r['error']}")
            continue
        t, one = r["via_router"]["throughput"], r["via_router"]["one_at_a_time"]
        cpu = t["cpu_util"]
        added = r.get("router_added_ms", {})
        lines.append(
            f"{r['router']:<8} {r['setup']:<5} {r['policy']:<12} {t['req_per_s']:>7.0f} "
            f"{t['p50_ms']:>7.2f} {t['p99_ms']:>7.2f} {sum(t['errors'].values()):>6} "
            f"{cpu['router']:>7.2f} {cpu['instances']:>7.2f} {cpu['loadgen']:>7.2f} "
            f"{t['cpu_ms_per_req']['router'] or float('nan'):>10.2f} "
            f"{t['req_per_s_per_core']['router'] or float('nan'):>10.0f} "
            f"{one['p50_ms']:>10.2f} {one['p99_ms']:>6.2f} "
            f"{added.get('p50', float('nan')):>9.2f} {added.get('p99', float('nan')):>6.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, 2P+2D only")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--setups", default=None, help=f"of {list(SETUPS)} (default: all)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--channels", type=int, default=4, help="client connections")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before measuring")
    parser.add_argument("--num-sequential", type=int, default=None, help="one-at-a-time requests")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--no-direct", dest="direct", action="store_false",
                        help="skip the baseline without the router")  # fmt: skip
    parser.add_argument("--no-pull-kv", action="store_true", help="simulated decode skips PullKV")
    cores = sorted(os.sched_getaffinity(0))
    rest = ",".join(map(str, cores[1:] or cores))
    parser.add_argument("--router-cores", default=str(cores[0]), help="taskset list")
    parser.add_argument("--instance-cores", default=rest, help="taskset list")
    parser.add_argument("--loadgen-cores", default=rest, help="taskset list")
    parser.add_argument("--router-src", action="append", default=[],
                        help="label=DIR: run the router from this source tree")  # fmt: skip
    parser.add_argument("--out", default="results/router_throughput.json")
    # the load generator process
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--pids", default="", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--instances", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 4.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.num_sequential is None:
        args.num_sequential = 100 if args.quick else 300
    if args.loadgen:
        result = asyncio.run(_loadgen(args))
        Path(args.out).write_text(json.dumps(result))
        return 0

    setups = (args.setups or ("2p2d" if args.quick else ",".join(SETUPS))).split(",")
    policies = args.policies.split(",")
    sources = [tuple(s.split("=", 1)) for s in args.router_src] or [("cwd", None)]
    model = _model()
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="router-throughput-") as tmp:
        for setup in setups:
            for policy in policies:
                for label, src in sources:
                    row = {"router": label, "router_src": src, "setup": setup, "policy": policy}
                    row["loadavg_before"] = os.getloadavg()
                    try:
                        row.update(run_one(args, model, Path(tmp), setup, policy, src))
                    except RuntimeError as exc:
                        row["error"] = str(exc)[-2000:]
                    if "direct" in row:
                        via, direct = row["via_router"]["one_at_a_time"], row["direct"]
                        row["router_added_ms"] = {
                            q: round(via[f"{q}_ms"] - direct["one_at_a_time"][f"{q}_ms"], 3)
                            for q in ("p50", "p99")
                        }
                    rows.append(row)
                    print(_table(rows[-1:]).splitlines()[-1], flush=True)
    table = _table(rows)
    print()
    print(table)
    result = {
        "benchmark": "router_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "cpu_count": os.cpu_count(),
            "cpus_allowed": cores,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "cores": {
            "router": args.router_cores,
            "instances": args.instance_cores,
            "loadgen": args.loadgen_cores,
        },
        "args": {k: v for k, v in vars(args).items() if k not in ("loadgen", "target", "pids")},
        "target_req_per_s": 1000,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
