"""Routed requests per second through the live router, with simulated instances behind it.

Issue 4's target: >= 1,000 routed requests/s. For each cluster shape and routing policy a fresh
router process starts (``distserve router``, exactly as deployed) and a process of simulated
instances registers with it (``distserve.instance.simulated``: real gRPC peers that answer at
once, without a model). A load generator process then drives the router's public
``Generation`` service with text prompts (shared prefixes, so the prefix-aware policies have
something to do) and short outputs, as the client SDK does by default (``--client
multiplexed``: ``AsyncClient``, every request of a connection on one ``GenerateStream``) or
with one ``Generate`` call per request (``--client per-call``, the raw stub):

    load generator ══GenerateStream══▶ router ══Session══▶ sim prefill ◀──PullKV── sim decode
     (closed loop)   (or Generate calls)      ══Session═══════════════════════▶ sim decode

(the router keeps one multiplexed ``Session`` stream per instance; each message carries a
batch of prefill / decode / generate entries or of their answers; ``GenerateStream`` batches
requests and their chunks the same way.)

Per policy and router it reports:
  * throughput: closed loop with ``--concurrency`` requests in flight: routed req/s, p50/p99
    end-to-end latency at that load, errors; the CPU each process used meanwhile, the router's
    CPU milliseconds per routed request and the rate one fully busy core sustains at that cost
    (req/s/core). On a shared machine both the share of a core a process gets and its cost per
    request vary with the load of others: compare variants measured side by side;
  * router-added latency: one request at a time, p50/p99 through the router minus the same
    requests sent by the load generator straight to the simulated instances (Prefill + Decode,
    what the router itself does).

``--floor`` adds a bare grpc.aio relay in the router's place (per-request RPCs: Prefill, then
a Decode stream, or Generate; no tokenization, policy, detokenization or metrics): the CPU per
request that a Python grpc.aio router pays for one call per request and phase before doing its
own work. The relay serves ``Generate`` and ``GenerateStream`` alike, so the floor is loaded
with the same ``--client`` as the router. ``--floor-session`` adds the same relay sending those
requests over the router's instance sessions (``distserve/router/session.py``) instead: the
floor under the router as it is.

``--router-src label=DIR`` (repeatable) runs one router per source tree (e.g. the commit before
a speed-up, and this one), each with its own simulated instances, all up at once. The load
generator takes turns between them (and the direct baseline) in slices of ``--slice`` seconds,
so that a noisy machine weighs on every variant alike; each variant's numbers sum its slices.
With ``--client multiplexed``, a router from a tree without ``GenerateStream`` is loaded one
call per request (the SDK falls back to that by itself).

Processes are pinned with ``taskset``: by default the routers get the first allowed core and the
simulated instances and the load generator share the rest (on a 2-core machine: router on core
0, everything else on core 1). Only one router is loaded at any time.

    python benchmarks/router_throughput.py                 # all policies, 2P+2D and 2 colocated
    python benchmarks/router_throughput.py --quick         # shorter, 2P+2D only
    python benchmarks/router_throughput.py --router-src before=/tmp/old --router-src after=. \
        --floor
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
from distserve.client import DistserveError

POLICIES = ("round_robin", "least_load", "cache_aware", "preble", "d2lpm")
SETUPS = {"2p2d": (2, 2, 0), "2c": (0, 0, 2)}  # name -> (prefill, decode, colocated)
_FLOOR = "<bare gRPC relay>"  # the source of the "floor" variant
_FLOOR_SESSION = "<bare gRPC relay, sessions>"  # the source of the "floor-session" variant
_FLOORS = (_FLOOR, _FLOOR_SESSION)
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima"


# ---- workload -------------------------------------------------------------------------------
def prompts(num_groups: int = 32, per_group: int = 16) -> list[str]:
    """Text prompts in prefix groups: a ~100-character shared prefix + a short unique tail."""
    words = WORDS.split(" ")
    out = []
    for g in range(num_groups):
        prefix = " ".join(words[(g + k) % len(words)] for k in range(14)) + f" group {g}."
        out.extend(f"{prefix} Question {q}: what comes next?" for q in range(per_group))
    order = sorted(range(len(out)), key=lambda i: (i * 7919) % len(out))  # interleave groups
    return [out[i] for i in order]


# ---- load generator (its own process) -------------------------------------------------------
def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


class _Target:
    """One thing to load: a router (``via_router``) or the simulated instances directly."""

    def __init__(self, spec: dict, texts: list[str], args: argparse.Namespace) -> None:
        self.label = spec["label"]
        self.pids: dict[str, int] = {**spec["pids"], "loadgen": os.getpid()}
        self.texts = texts
        self.sampling = generation_pb2.SamplingOptions(
            max_tokens=args.max_tokens, temperature=0, ignore_eos=True
        )
        self.channels: list[grpc.aio.Channel] = []
        # measurements, summed over this target's slices
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.measured_s = 0.0
        self.cpu_s = dict.fromkeys(self.pids, 0.0)
        self.one_at_a_time: list[float] = []
        self.clients: list = []  # --client multiplexed: SDK clients, one connection each
        if "router" in spec and args.client == "multiplexed":
            from distserve.client import AsyncClient

            self.clients = [
                AsyncClient(spec["router"], timeout_s=30, multiplex=True)
                for _ in range(args.channels)
            ]
            self.call = self._via_router_multiplexed
        elif "router" in spec:
            self.channels = [
                grpc.aio.insecure_channel(spec["router"]) for _ in range(args.channels)
            ]
            self.stubs = [generation_pb2_grpc.GenerationStub(c) for c in self.channels]
            self.call = self._via_router
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.model)
            self.ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
            self.direct: dict[str, list] = {}
            for instance_id, address in spec["instances"].items():
                self.channels.append(grpc.aio.insecure_channel(address))
                role = instance_id.split("-")[1]  # sim-<role>-<i>
                stub = instance_pb2_grpc.InstanceStub(self.channels[-1])
                self.direct.setdefault(role, []).append(stub)
            self.call = self._direct

    async def _via_router(self, i: int) -> None:
        request = generation_pb2.GenerateRequest(
            text=self.texts[i % len(self.texts)], sampling=self.sampling, client_id=f"c{i % 8}"
        )
        finish = ""
        async for msg in self.stubs[i % len(self.stubs)].Generate(request, timeout=30):
            finish = msg.finish_reason or finish
        if not finish:
            raise RuntimeError("stream ended without a finish reason")

    async def _via_router_multiplexed(self, i: int) -> None:
        client = self.clients[i % len(self.clients)]
        finish = None
        async for chunk in client.stream(
            self.texts[i % len(self.texts)],
            max_tokens=self.sampling.max_tokens,
            temperature=0,
            ignore_eos=True,
            client_id=f"c{i % 8}",
        ):
            finish = chunk.finish_reason or finish
        if not finish:
            raise RuntimeError("stream ended without a finish reason")

    async def _direct(self, i: int) -> None:
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

    async def slice(self, concurrency: int, warmup_s: float, slice_s: float, first: int) -> int:
        """Closed loop for warm-up + ``slice_s``; records what finished inside the slice."""
        start = time.perf_counter()
        window = (start + warmup_s, start + warmup_s + slice_s)
        count = 0

        async def worker(i: int) -> None:
            nonlocal count
            while (t0 := time.perf_counter()) < window[1]:
                try:
                    await self.call(i)
                    ok = True
                except (grpc.aio.AioRpcError, DistserveError, RuntimeError) as exc:
                    ok = False
                    if isinstance(exc, grpc.aio.AioRpcError):
                        code = exc.code().name
                    else:
                        code = getattr(exc, "code", "") or str(exc)
                    self.errors[code] = self.errors.get(code, 0) + 1
                t1 = time.perf_counter()
                if ok and window[0] <= t1 <= window[1]:
                    self.latencies.append(t1 - t0)
                i += concurrency
                count += 1

        async def sample_cpu() -> None:
            await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
            before = {name: _cpu_s(pid) for name, pid in self.pids.items()}
            t0 = time.perf_counter()
            await asyncio.sleep(max(0.0, window[1] - t0))
            for name, pid in self.pids.items():
                self.cpu_s[name] += _cpu_s(pid) - before[name]
            self.measured_s += time.perf_counter() - t0

        await asyncio.gather(sample_cpu(), *(worker(first + w) for w in range(concurrency)))
        return count

    async def one(self, i: int) -> None:
        t0 = time.perf_counter()
        await self.call(i)
        self.one_at_a_time.append(time.perf_counter() - t0)

    def summary(self, concurrency: int) -> dict:
        rate = len(self.latencies) / self.measured_s if self.measured_s else 0.0
        cpu_util = {k: v / self.measured_s for k, v in self.cpu_s.items()} if rate else {}
        return {
            "throughput": {
                "concurrency": concurrency,
                "measured_s": round(self.measured_s, 2),
                "num_completed": len(self.latencies),
                "req_per_s": round(rate, 1),
                "p50_ms": _ms(_percentile(self.latencies, 0.50)),
                "p99_ms": _ms(_percentile(self.latencies, 0.99)),
                "mean_ms": _ms(statistics.fmean(self.latencies) if self.latencies else None),
                "errors": self.errors,
                "cpu_util": {k: round(v, 3) for k, v in cpu_util.items()},  # 1.0 = a core busy
                # CPU milliseconds per routed request, and the rate one busy core sustains at it
                "cpu_ms_per_req": {k: round(v * 1e3 / rate, 3) for k, v in cpu_util.items()},
                "req_per_s_per_core": {
                    k: round(rate / v, 1) if v else None for k, v in cpu_util.items()
                },
            },
            "one_at_a_time": {
                "num_requests": len(self.one_at_a_time),
                "p50_ms": _ms(_percentile(self.one_at_a_time, 0.50)),
                "p99_ms": _ms(_percentile(self.one_at_a_time, 0.99)),
            },
        }

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for channel in self.channels:
            await channel.close()


async def _loadgen(args: argparse.Namespace) -> dict:
    """Take turns between the targets: slices of closed-loop load, then one-at-a-time requests."""
    specs = json.loads(Path(args.targets).read_text())
    texts = prompts()
    targets = [_Target(spec, texts, args) for spec in specs]
    try:
        for target in targets:  # connections up, caches warm
            for i in range(20):
                await target.call(i)
        num_slices = max(1, round(args.duration / args.slice))
        issued = 0
        for _ in range(num_slices):
            for target in targets:
                issued += await target.slice(args.concurrency, args.warmup, args.slice, issued)
        for i in range(args.num_sequential):
            for target in targets:
                await target.one(i)
    finally:
        for target in targets:
            await target.close()
    return {t.label: t.summary(args.concurrency) for t in targets}


# ---- the floor: a bare gRPC relay in place of the router (its own process) -------------------
class _Relay(generation_pb2_grpc.GenerationServicer, instance_pb2_grpc.RegistryServicer):
    """What any Python grpc.aio router must do per request, and nothing else.

    A Generate call (or a GenerateStream entry) in; Prefill, then a Decode stream out, or a
    colocated instance's Generate stream (one response per token), with instances taken in
    turn: no tokenization (prompt bytes as ids), no block hashes, policy, detokenization or
    metrics. Its CPU per request is
    the floor the router's own work sits on. Registrations are all accepted. With
    ``use_sessions`` the requests to instances go over one ``InstanceSession`` per instance, as
    the router sends them; otherwise one RPC per request and phase.
    """

    def __init__(self, use_sessions: bool = False) -> None:
        self.stubs: dict[str, list] = {}  # role -> InstanceStub or InstanceSession
        self.channels: list[grpc.aio.Channel] = []
        self.use_sessions = use_sessions
        self.count = 0

    async def Register(self, request, context):
        from distserve.router.session import InstanceSession
        from distserve.rpc.options import channel_options

        if self.use_sessions:
            channel = grpc.aio.insecure_channel(request.address, options=channel_options())
            stub = InstanceSession(request.instance_id, channel)
        else:
            channel = grpc.aio.insecure_channel(request.address)
            stub = instance_pb2_grpc.InstanceStub(channel)
        self.channels.append(channel)
        self.stubs.setdefault(request.role, []).append(stub)
        return instance_pb2.RegisterResponse(accepted=True)

    async def Report(self, request, context):
        return instance_pb2.ReportAck(known=True)

    async def ListInstances(self, request, context):
        n = sum(len(s) for s in self.stubs.values())
        return instance_pb2.InstanceList(instances=[instance_pb2.InstanceInfo()] * n)

    async def GenerateStream(self, request_iterator, context):
        from distserve.rpc.generate_stream import serve_generate_stream

        async for events in serve_generate_stream(request_iterator, self.Generate):
            yield events

    async def Generate(self, request, context=None):
        self.count += 1
        rid = f"relay-{self.count}"
        engine_request = instance_pb2.EngineRequest(
            request_id=rid,
            client_id=request.client_id,
            prompt_token_ids=request.text.encode(),
            sampling=request.sampling,
        )
        if "colocated" in self.stubs:
            stub = self.stubs["colocated"][self.count % len(self.stubs["colocated"])]
            if self.use_sessions:
                chunks = stub.generate(engine_request, 30)
            else:
                chunks = stub.Generate(engine_request, timeout=30)
            async for chunk in chunks:
                yield generation_pb2.GenerateResponse(
                    request_id=rid, token_ids=chunk.token_ids, finish_reason=chunk.finish_reason
                )
            return
        prefill = self.stubs["prefill"][self.count % len(self.stubs["prefill"])]
        if self.use_sessions:
            first = await prefill.prefill(engine_request, 30)
        else:
            first = await prefill.Prefill(engine_request, timeout=30)
        yield generation_pb2.GenerateResponse(
            request_id=rid, token_ids=[first.first_token_id], finish_reason=first.finish_reason
        )
        if first.finish_reason:
            return
        decode = self.stubs["decode"][self.count % len(self.stubs["decode"])]
        decode_request = instance_pb2.DecodeRequest(
            request=engine_request, first_token_id=first.first_token_id, kv=first.kv
        )
        if self.use_sessions:
            chunks = decode.decode(decode_request, 30)
        else:
            chunks = decode.Decode(decode_request, timeout=30)
        async for chunk in chunks:
            yield generation_pb2.GenerateResponse(
                request_id=rid, token_ids=chunk.token_ids, finish_reason=chunk.finish_reason
            )


async def _relay(ready_file: str, use_sessions: bool) -> None:
    relay = _Relay(use_sessions)
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServicer_to_server(relay, server)
    instance_pb2_grpc.add_RegistryServicer_to_server(relay, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    Path(f"{ready_file}.tmp").write_text(json.dumps({"grpc": f"127.0.0.1:{port}"}))
    Path(f"{ready_file}.tmp").replace(ready_file)
    await stop.wait()
    await server.stop(0.5)


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


def _wait_file(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> dict:
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


def run_policy(
    args: argparse.Namespace,
    model: Path,
    workdir: Path,
    setup: str,
    policy: str,
    sources: list[tuple[str, str | None]],
) -> dict[str, dict]:
    """One router (+ its simulated instances) per source, all loaded in turns by one generator."""
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
    config_path = workdir / f"{setup}-{policy}.yaml"
    config_path.write_text(config.to_yaml())
    procs: list[subprocess.Popen] = []
    specs: list[dict] = []
    direct: dict | None = None  # the direct baseline: the first router's simulated instances
    try:
        for label, src in sources:
            tag = f"{setup}-{policy}-{label}"
            ready, log = workdir / f"{tag}.router.json", workdir / f"{tag}.router.log"
            if src in _FLOORS:
                cmd = [sys.executable, __file__, "--relay", "--out", str(ready)]
                cmd += ["--relay-sessions"] if src == _FLOOR_SESSION else []
            else:
                cmd = [sys.executable, "-m", "distserve.cli", "--log-level", "WARNING", "router"]
                cmd += ["--config", str(config_path), "--ready-file", str(ready)]
            router = _spawn(cmd, args.router_cores, log, pythonpath=None if src in _FLOORS else src)
            procs.append(router)
            address = _wait_file(ready, router, log)["grpc"]
            sims_ready, sims_log = workdir / f"{tag}.sims.json", workdir / f"{tag}.sims.log"
            sims = _spawn(
                [sys.executable, "-m", "distserve.instance.simulated", "--router", address]
                + ["--model", str(model), "--ready-file", str(sims_ready)]
                + ["--prefill", str(num_prefill), "--decode", str(num_decode)]
                + ["--colocated", str(num_colocated)]
                + (["--no-pull-kv"] if args.no_pull_kv else []),
                args.instance_cores,
                sims_log,
            )
            procs.append(sims)
            instances = _wait_file(sims_ready, sims, sims_log)
            _wait_registered(address, num_prefill + num_decode + num_colocated)
            pids = {"router": router.pid, "instances": sims.pid}
            specs.append({"label": label, "router": address, "pids": pids})
            if args.direct and direct is None and src not in _FLOORS:
                direct = {
                    "label": "direct",
                    "instances": instances,
                    "pids": {"instances": sims.pid},
                }
        if direct is not None:
            specs.append(direct)
        time.sleep(1.0)  # a heartbeat or two: loads are known
        results = _run_loadgen(args, model, workdir, specs)
        for proc, (label, _) in zip(procs[::2], sources, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"router {label} died during the run")
        return results
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _run_loadgen(args, model: Path, workdir: Path, specs: list[dict]) -> dict[str, dict]:
    targets, out = workdir / "targets.json", workdir / "loadgen.json"
    targets.write_text(json.dumps(specs))
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--loadgen", "--targets", str(targets), "--out", str(out)]
    cmd += ["--model", str(model), "--max-tokens", str(args.max_tokens)]
    cmd += ["--concurrency", str(args.concurrency), "--channels", str(args.channels)]
    cmd += ["--client", args.client]
    cmd += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    cmd += ["--slice", str(args.slice), "--num-sequential", str(args.num_sequential)]
    log = workdir / "loadgen.log"
    proc = _spawn(cmd, args.loadgen_cores, log)
    budget = len(specs) * (args.duration * (1 + args.warmup / args.slice) + 60) + 120
    try:
        proc.wait(budget)
    except subprocess.TimeoutExpired:
        pass
    finally:
        _stop(proc)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"load generator failed:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def _table(rows: list[dict]) -> str:
    head = (
        f"{'router':<13} {'setup':<5} {'policy':<12} {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'rtr cpu':>7} {'sim cpu':>7} {'gen cpu':>7} {'rtr ms/req':>10} "
        f"{'req/s/core':>10} {'1by1 p50':>8} {'p99':>6} {'added p50':>9} {'p99':>6}"
    )
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in rows:
        name = f"{r['router']:<13} {r['setup']:<5} {r['policy']:<12}"
        if "error" in r:
            lines.append(f"{name} FAILED: {r['error'][:200]}")
            continue
        t, one = r["throughput"], r["one_at_a_time"]
        cpu = t["cpu_util"]
        added = r.get("router_added_ms", {})
        lines.append(
            f"{name} {t['req_per_s']:>6.0f} {t['p50_ms'] or nan:>7.1f} {t['p99_ms'] or nan:>7.1f} "
            f"{sum(t['errors'].values()):>6} {cpu.get('router', nan):>7.2f} "
            f"{cpu.get('instances', nan):>7.2f} {cpu.get('loadgen', nan):>7.2f} "
            f"{t['cpu_ms_per_req'].get('router', nan):>10.2f} "
            f"{t['req_per_s_per_core'].get('router') or nan:>10.0f} "
            f"{one['p50_ms'] or nan:>8.2f} {one['p99_ms'] or nan:>6.2f} "
            f"{added.get('p50', nan):>9.2f} {added.get('p99', nan):>6.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, 2P+2D only")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--setups", default=None, help=f"of {list(SETUPS)} (default: all)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--channels", type=int, default=4,
                        help="client connections per router (multiplexed: one stream each)")  # fmt: skip
    parser.add_argument("--client", choices=("multiplexed", "per-call"), default="multiplexed",
                        help="the SDK's GenerateStream (its default) or one Generate call "
                        "per request")  # fmt: skip
    parser.add_argument("--duration", type=float, default=None, help="measured s per target")
    parser.add_argument("--slice", type=float, default=2.0, help="s per turn of one target")
    parser.add_argument("--warmup", type=float, default=0.3, help="s unmeasured per turn")
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
                        help="label=DIR: also run a router from this source tree")  # fmt: skip
    parser.add_argument("--floor", action="store_true",
                        help="also load a bare gRPC relay in the router's place")  # fmt: skip
    parser.add_argument("--floor-session", action="store_true",
                        help="also load that relay sending over instance sessions")  # fmt: skip
    parser.add_argument("--out", default="results/router_throughput.json")
    parser.add_argument("--relay", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--relay-sessions", action="store_true", help=argparse.SUPPRESS)
    # the load generator process
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 4.0 if args.quick else 10.0
    if args.num_sequential is None:
        args.num_sequential = 50 if args.quick else 200
    if args.relay:
        asyncio.run(_relay(args.out, args.relay_sessions))
        return 0
    if args.loadgen:
        Path(args.out).write_text(json.dumps(asyncio.run(_loadgen(args))))
        return 0

    setups = (args.setups or ("2p2d" if args.quick else ",".join(SETUPS))).split(",")
    policies = args.policies.split(",")
    sources = [tuple(s.split("=", 1)) for s in args.router_src] or [("this", None)]
    sources = [(label, str(Path(src).resolve()) if src else None) for label, src in sources]
    if args.floor:
        sources.append(("floor", _FLOOR))
    if args.floor_session:
        sources.append(("floor-session", _FLOOR_SESSION))
    model = _model()
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="router-throughput-") as tmp:
        for setup in setups:
            for policy in policies:
                load_before = os.getloadavg()
                try:
                    results = run_policy(args, model, Path(tmp), setup, policy, sources)
                except RuntimeError as exc:
                    results = {label: {"error": str(exc)[-2000:]} for label, _ in sources}
                direct = results.pop("direct", None)
                for label, src in sources:
                    row = {"router": label, "router_src": src, "setup": setup, "policy": policy}
                    row["loadavg_before"] = load_before
                    row.update(results[label])
                    if direct is not None and "error" not in row:
                        via, base = row["one_at_a_time"], direct["one_at_a_time"]
                        row["direct"] = direct
                        row["router_added_ms"] = {
                            q: round(via[f"{q}_ms"] - base[f"{q}_ms"], 3) for q in ("p50", "p99")
                        }
                    rows.append(row)
                    print(_table(rows[-1:]).splitlines()[-1], flush=True)
    table = _table(rows)
    print()
    print(table)
    result = {
        "benchmark": "router_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
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
        "args": {k: v for k, v in vars(args).items() if k not in ("loadgen", "targets", "model")},
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
