"""Validate the planner on this machine: profile, plan for 2 devices, run both clusters, compare.

Stages (each result is kept in ``--workdir``; a rerun skips what exists, ``--fresh`` redoes all):

1. model     a small random Llama (``--shape medium``: the demo architecture at 4 layers × 256
             hidden, so the engine, not RPC, dominates a step; ``--shape demo``: the demo model)
2. profile   ``distserve profile`` on TP 1 and 2, ranks pinned to cores 0 and 1
3. plan      ``make_plan`` for 2 devices (one node of 2 pinned cores); SLOs ``auto`` = a multiple
             of the profiled prefill and decode times (printed); writes both YAMLs
4. bench     the planned cluster and the best colocated cluster, each started with
             ``LocalCluster`` from its YAML (cores pinned), loaded by ``distserve bench``
             (``--dataset random``) at the same rates around the predicted goodputs
5. compare   the simulator on exactly the bench's requests (same lengths, same arrival times)
             vs the measured attainment at every rate (three ways, below;
             ``placement_validate_sim.py``); measured goodput, disaggregated vs colocated;
             prints a table and writes JSON

The router and the bench client are not pinned: they share the two cores with the instances
(``--host-nice`` lowers their priority; 19 starves them once every core is busy). How much of
the cores each process actually got is recorded during every bench run: per rank process, the
CPU time its threads ran and the time they were runnable but waited for a core
(``/proc/<pid>/task/*/schedstat``), for all its threads and for the engine thread alone
(``cpu_share`` = ran / (ran + waited)); the CPU the router, the bench client (its own count,
while measuring) and the ranks' other threads (gRPC, transfers) used; and, before the first run,
what they use per second with no request in flight.

Three simulations per rate, each on exactly the requests the bench sent (lengths and arrival
times): the raw profile (what the planner predicted); "low-rate run's step speed": every step
of a role ``speed`` times the profile's, ``speed`` being what that role's instances ran at in
the low-rate run before the sweep (a prediction); and "in-run step speed": the same with the
speed they ran at while that rate was measured (a reconstruction). A speed is the summed time
of an instance's steps over the profile's time for the same batches, read from the run's
``DISTSERVE_TIMELINE`` (kept in ``WORKDIR/timeline``). The last separates the simulator's model
of serving (queues, batching, chunking, the KV hand-off) from the profile going stale: on this
VM the same step's time drifts within minutes, and the router and the bench client
share the cores that stand for devices.

Each row also splits a request's TPOT: the first gap (first token → second token: for the
disaggregated cluster the hand-off — Decode RPC, KV pull, joining the batch) and the median
of the remaining inter-token gaps.

    python benchmarks/placement_validate.py [--quick] [--workdir DIR] [--out results/placement_validate.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from placement_validate_sim import (
    bench_lengths,
    bench_workload,
    rate_windows,
    role_ranks,
    simulate,
    step_speed,
)

from distserve import timeline
from distserve.bench.report import find_goodput
from placement.evaluate import SLO, PhaseConfig, Placement, SimSettings
from placement.profile_format import load_profile, save_profile
from placement.workload import from_lengths

SHAPES = {
    "medium": {
        "layers": 4,
        "hidden_size": 256,
        "heads": 4,
        "kv_heads": 2,
        "intermediate_size": 688,
    },
    "large": {
        "layers": 8,
        "hidden_size": 512,
        "heads": 8,
        "kv_heads": 4,
        "intermediate_size": 1376,
    },
}


def stage_model(args: argparse.Namespace, work: Path) -> Path:
    if args.shape == "demo":
        from distserve.launch.serve import demo_model_path

        return demo_model_path()
    path = work / "model"
    if not (path / "config.json").exists():
        from distserve.model.tiny_model import make_tiny_model

        make_tiny_model(path, arch="llama", seed=0, preset="tiny", **SHAPES[args.shape])
    return path


def stage_profile(args: argparse.Namespace, work: Path, model: Path) -> Path:
    path = work / "profile.json"
    if not path.exists():
        from placement.profiler import ProfileOptions, run_profiler

        opts = ProfileOptions(
            str(model), "validate", tps=(1, 2), quick=args.quick, kv_cache_gib=0.25,
            max_prompt_len=512, max_batch_size=64, cores=(0, 1),
        )  # fmt: skip
        profile, report = run_profiler(opts)
        save_profile(profile, path)
        print(report)
    return path


def lengths(args: argparse.Namespace, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return bench_lengths(args.input_len, args.output_len, args.range_ratio, n, seed)


def placement_dict(p: Placement) -> dict[str, Any]:
    def cfg(c: PhaseConfig | None, n: int) -> list[int] | None:
        return None if c is None else [c.tp, c.pp, n]

    return {
        "prefill": cfg(p.prefill, p.num_prefill),
        "decode": cfg(p.decode, p.num_decode),
        "colocated": cfg(p.colocated, p.num_colocated),
        "transfer_bytes_per_s": p.transfer_bytes_per_s,
    }


def placement_from(d: dict[str, Any]) -> Placement:
    kw: dict[str, Any] = {"transfer_bytes_per_s": d["transfer_bytes_per_s"]}
    for role in ("prefill", "decode", "colocated"):
        if d[role]:
            tp, pp, n = d[role]
            kw[role], kw[f"num_{role}"] = PhaseConfig(tp, pp), n
    return Placement(**kw)


def stage_plan(args: argparse.Namespace, work: Path, profile_path: Path) -> dict[str, Any]:
    path = work / "plan.json"
    if path.exists():
        return json.loads(path.read_text())
    from placement.output import cluster_yaml, summary_text, write_yaml
    from placement.planner import make_plan
    from placement.search import ClusterShape

    profile = load_profile(profile_path)
    model = profile.model("validate")
    lat = model.latency(1)
    ttft, tpot = args.ttft_slo, args.tpot_slo
    if ttft is None:  # a few prefills of the mean prompt: queueing has to be managed
        ttft = round(4 * lat.prefill_ms([args.input_len]) / 1e3, 3)
    if tpot is None:  # room for a decode batch of 16 and some interference
        ctx = 16 * (args.input_len + args.output_len)
        tpot = round(2.5 * lat.decode_ms(16, ctx) / 1e3, 4)
    ins, outs = lengths(args, args.plan_requests, seed=1000 + args.seed)
    workload = from_lengths("bench-random", ins, outs, seed=1000 + args.seed)
    slo = SLO(ttft, tpot, 0.9)
    two_devices = ClusterShape(gpus_per_node=2, num_nodes=1)
    plan = make_plan(profile, "validate", workload, slo, two_devices, gpus=2)
    print(summary_text(plan))
    if plan.colocated is None:
        raise SystemExit("no colocated cluster meets the SLOs at any rate: nothing to compare")
    out = {"slo": vars(slo), "settings": vars(plan.settings), "clusters": {}}
    for name, sized, budget in (
        ("disaggregated", plan.chosen, None),
        ("colocated", plan.colocated, plan.colocated_budget),
    ):
        data = cluster_yaml(
            plan, sized.placement, str(model.path), "cpu", model.kv_cache_memory_gib
        )
        write_yaml(data, work / f"{name}.yaml", f"{name}: {sized.placement}")
        out["clusters"][name] = {
            "placement": placement_dict(sized.placement),
            "label": str(sized.placement),
            "predicted_goodput_per_s": sized.predicted_rate_per_s,
            "colocated_budget": budget,
        }
    path.write_text(json.dumps(out, indent=1))
    return out


def rate_grid(plan: dict[str, Any], points: int) -> list[float]:
    preds = [c["predicted_goodput_per_s"] for c in plan["clusters"].values()]
    lo, hi = 0.5 * min(preds), 1.5 * max(preds)
    return [round(lo * (hi / lo) ** (i / (points - 1)), 3) for i in range(points)]


def stage_bench(
    args: argparse.Namespace, work: Path, name: str, plan: dict[str, Any], rates: list[float]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One cluster session: a calibration run at ``calibration_rate`` then the rate sweep."""
    paths = work / f"calib_{name}.json", work / f"bench_{name}.json"
    if all(p.exists() for p in paths):
        return json.loads(paths[0].read_text()), json.loads(paths[1].read_text())
    from distserve.launch.cluster_config import cluster_config_from_dict
    from distserve.launch.local_cluster import LocalCluster

    data = yaml.safe_load((work / f"{name}.yaml").read_text())
    data["router"].update(grpc_port=0, http_port=None)
    config = cluster_config_from_dict(data)
    runs = (
        (paths[0], [calibration_rate(plan)], args.calibration_prompts),
        (paths[1], rates, args.num_prompts),
    )
    # every step's time and composition, from the cluster's processes and the bench's
    timeline = work / "timeline" / name
    shutil.rmtree(timeline, ignore_errors=True)
    os.environ["DISTSERVE_TIMELINE"] = str(timeline)
    with (
        LocalCluster(config, log_dir=work / "logs" / name, log_level="WARNING") as cluster,
        contextlib.ExitStack() as unset,
    ):
        unset.callback(os.environ.pop, "DISTSERVE_TIMELINE", None)
        if args.host_nice:
            lower_priority(cluster.router.pid, args.host_nice)
        idle = idle_cpu(cluster)
        for path, sweep, n in runs:
            load_before = os.getloadavg()
            cpu_before, wall_start = cpu_snapshot(cluster), time.monotonic()
            cmd = [
                sys.executable, "-m", "distserve.cli", "bench",
                "--endpoint", f"grpc://{cluster.grpc_address}", "--dataset", "random",
                "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                "--range-ratio", str(args.range_ratio), "--num-prompts", str(n),
                "--rates", ",".join(str(r) for r in sweep), "--seed", str(args.seed),
                "--ttft-slo", str(plan["slo"]["ttft_s"]), "--tpot-slo", str(plan["slo"]["tpot_s"]),
                "--num-devices", "2", "--warmup-requests", str(args.warmup_requests), "--save-requests",
                "--disable-tqdm", "--out", str(path) + ".partial",
            ]  # fmt: skip
            client = subprocess.Popen(cmd, start_new_session=True)
            if args.host_nice:
                lower_priority(client.pid, args.host_nice)
            if client.wait() != 0:
                raise SystemExit(f"distserve bench failed (exit {client.returncode})")
            report = json.loads(Path(str(path) + ".partial").read_text())
            report["load_avg"] = {"before": load_before, "after": os.getloadavg()}
            measured = sum(len(r.get("requests", [])) for r in report["results"])
            use = cpu_use(cpu_before, cpu_snapshot(cluster), measured + args.warmup_requests)
            use["wall_s"] = time.monotonic() - wall_start
            use["num_measured"] = measured
            # the bench's own CPU while it measured (without its start-up and warm-up)
            use["client_measured_cpu_s"] = sum(r["client_cpu_s"] for r in report["results"])
            use["idle_cpu_per_s"] = idle
            report["rank_cpu"] = use
            report["timeline"] = {
                "folder": str(timeline),
                "client_pid": client.pid,
                "rank_pids": [p.pid for p in cluster.ranks],
            }
            path.write_text(json.dumps(report, indent=1))
            os.unlink(str(path) + ".partial")
    return json.loads(paths[0].read_text()), json.loads(paths[1].read_text())


def lower_priority(pid: int, nice: int) -> None:
    """Give a host process (router, bench client) less of a core than the instances.

    With the kernel's autogroups (one per session: every process here starts its own) nice
    values only rank threads inside a group, so the group's own nice value is set; without
    them, every thread's."""
    autogroup = Path(f"/proc/{pid}/autogroup")
    try:
        autogroup.write_text(str(nice))
    except OSError:
        pass
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)


def thread_schedstats(pid: int) -> dict[int, tuple[int, int]]:
    """Per thread of ``pid``: (ns it ran, ns it waited runnable for a core)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:  # a thread that just ended
            continue
        out[int(task.name)] = (int(fields[0]), int(fields[1]))
    return out


def cpu_snapshot(cluster: Any) -> dict[str, Any]:
    """Scheduler counters of every rank's threads and of the router, and the children's CPU."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "ranks": {f"rank{i}": thread_schedstats(p.pid) for i, p in enumerate(cluster.ranks)},
        "router": thread_schedstats(cluster.router.pid),
        "children_cpu_s": usage.ru_utime + usage.ru_stime,
    }


def idle_cpu(cluster: Any, seconds: float = 3.0) -> dict[str, float]:
    """CPU per second the router and each rank use with no request in flight (heartbeats,
    idle wake-ups): background that every run pays whatever its rate."""
    before = cpu_snapshot(cluster)
    time.sleep(seconds)
    after = cpu_snapshot(cluster)

    def ran(b: dict[int, tuple[int, int]], a: dict[int, tuple[int, int]]) -> float:
        return sum(r - b.get(tid, (0, 0))[0] for tid, (r, _) in a.items()) / 1e9 / seconds

    out = {"router": ran(before["router"], after["router"])}
    for rank, threads in after["ranks"].items():
        out[rank] = ran(before["ranks"][rank], threads)
    return out


def cpu_use(before: dict[str, Any], after: dict[str, Any], num_requests: int) -> dict[str, Any]:
    """What each process got during one bench run.

    Per rank: all its threads (``cpu_share`` = ran / (ran + waited runnable)), and its engine
    thread alone (the thread that ran most) with the CPU its other threads (gRPC, transfers)
    used meanwhile. ``router_cpu_s`` and ``client_cpu_s`` (the bench process, the only child
    that ended in between) are what the unpinned host processes took from the two cores."""

    def delta(
        b: dict[int, tuple[int, int]], a: dict[int, tuple[int, int]]
    ) -> dict[int, tuple[float, float]]:
        return {
            tid: ((ran - b.get(tid, (0, 0))[0]) / 1e9, (waited - b.get(tid, (0, 0))[1]) / 1e9)
            for tid, (ran, waited) in a.items()
        }

    def share(ran: float, waited: float) -> float:
        return ran / (ran + waited) if ran + waited > 0 else float("nan")

    out: dict[str, Any] = {"num_requests": num_requests}
    for rank, threads in after["ranks"].items():
        d = delta(before["ranks"][rank], threads)
        ran, waited = sum(r for r, _ in d.values()), sum(w for _, w in d.values())
        engine = max(d, key=lambda tid: d[tid][0]) if d else None
        e_ran, e_waited = d[engine] if engine is not None else (0.0, 0.0)
        out[rank] = {
            "ran_s": ran, "waited_s": waited, "cpu_share": share(ran, waited),
            "engine_ran_s": e_ran, "engine_waited_s": e_waited,
            "engine_cpu_share": share(e_ran, e_waited), "other_threads_ran_s": ran - e_ran,
        }  # fmt: skip
    router = delta(before["router"], after["router"])
    out["router_cpu_s"] = sum(r for r, _ in router.values())
    out["client_cpu_s"] = after["children_cpu_s"] - before["children_cpu_s"]
    return out


def gap_split(requests: list[dict[str, Any]]) -> tuple[float, float]:
    """(median first inter-token gap, median of the later ones) over a run's requests, seconds."""
    first = [r["itl_s"][0] for r in requests if r.get("itl_s")]
    rest = [g for r in requests if r.get("itl_s") for g in r["itl_s"][1:]]

    def median(xs: list[float]) -> float:
        return float(np.median(xs)) if xs else float("nan")

    return median(first), median(rest)


@functools.cache
def _timelines(folder: str) -> dict[int, timeline.ProcessTimeline]:
    """A cluster's timeline folder, read once for its calibration run and every rate."""
    return timeline.read(folder)


def run_speed(
    args: argparse.Namespace,
    model: Any,
    p: Placement,
    report: dict[str, Any],
    index: int,
    num_rates: int,
    per_rate: int | None = None,
) -> dict[str, float] | None:
    """Per role, how much slower than the profile the instances' steps ran while rate
    ``index`` was measured (their summed time over the profile's for the same batches, from
    the run's timeline; the mean over the role's instances), or None without a timeline."""
    info = report.get("timeline")
    if not info or not Path(info["folder"]).exists():
        return None
    timelines = _timelines(info["folder"])
    empty = timeline.ProcessTimeline()
    window = rate_windows(
        timelines.get(info["client_pid"], empty),
        args.warmup_requests,
        per_rate or args.num_prompts,
        num_rates,
    )[index]
    out = {}
    for role, ranks in role_ranks(p).items():
        cfg = {"prefill": p.prefill, "decode": p.decode, "colocated": p.colocated}[role]
        lat = model.latency(cfg.tp, cfg.pp)
        pids = [info["rank_pids"][int(r.removeprefix("rank"))] for r in ranks]
        speeds = [
            s for pid in pids if (s := step_speed(timelines.get(pid, empty), lat, role, window))
        ]
        if speeds:
            out[role] = sum(speeds) / len(speeds)
    return out or None


def calibration_rate(plan: dict[str, Any]) -> float:
    """A rate low enough that nothing queues: a fifth of the lower predicted goodput."""
    return round(0.2 * min(c["predicted_goodput_per_s"] for c in plan["clusters"].values()), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/placement_validate")
    ap.add_argument(
        "--shape", choices=[*SHAPES, "demo"], default="medium",
        help="the model: 'large' (8 layers x 512) costs each request ~8x the engine time of "
        "'medium' (4 x 256) for the same router and client CPU",
    )  # fmt: skip
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--range-ratio", type=float, default=0.5)
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--calibration-prompts", type=int, default=16)
    ap.add_argument(
        "--warmup-requests", type=int, default=24, help="sent (and not measured) before each run"
    )
    ap.add_argument("--plan-requests", type=int, default=600)
    ap.add_argument("--rates", type=int, default=5, help="rates per cluster")
    ap.add_argument("--ttft-slo", type=float, default=None, help="seconds (default: auto)")
    ap.add_argument("--tpot-slo", type=float, default=None, help="seconds (default: auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--host-nice", type=int, default=0,
        help="nice value of the router and bench client (their autogroups; 0: an equal share). "
        "19 keeps them off the instances' cores while those are busy, but starves them when "
        "every core is (colocated instances decoding)",
    )  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="quick profile, 3 rates, 40 prompts")
    ap.add_argument("--fresh", action="store_true", help="redo every stage")
    ap.add_argument("--out", default="results/placement_validate.json")
    args = ap.parse_args()
    if args.quick:
        args.rates, args.num_prompts = 3, 40
    work = Path(args.workdir)
    if args.fresh and work.exists():
        for f in work.glob("*.json"):
            f.unlink()
    work.mkdir(parents=True, exist_ok=True)
    model = stage_model(args, work)
    profile_path = stage_profile(args, work, model)
    plan = stage_plan(args, work, profile_path)
    rates = rate_grid(plan, args.rates)
    profile = load_profile(profile_path)
    slo = SLO(**plan["slo"])
    rows, summary = [], {}
    for name, c in plan["clusters"].items():
        calib, report = stage_bench(args, work, name, plan, rates)
        settings = SimSettings(**plan["settings"])
        if c["colocated_budget"]:
            settings = replace(settings, colocated_token_budget=c["colocated_budget"])
        model, p = profile.model("validate"), placement_from(c["placement"])
        lens = lengths(args, args.num_prompts, args.seed)
        # measured before the sweep: a prediction, where the in-run speed is a reconstruction
        low_speed = run_speed(args, model, p, calib, 0, 1, per_rate=args.calibration_prompts)
        for i, r in enumerate(report["results"]):
            rate = float(r["rate_per_s"])
            workload = bench_workload(lens, rate, args.seed)  # the bench's one seed, every rate
            raw = simulate(model, slo, settings, p, workload, rate)
            speed = run_speed(args, model, p, report, i, len(rates))
            in_run = simulate(model, slo, settings, p, workload, rate, speed) if speed else None
            ahead = (
                simulate(model, slo, settings, p, workload, rate, low_speed) if low_speed else None
            )
            first_gap, later_gaps = gap_split(r.get("requests", []))
            rows.append({
                "cluster": name, "placement": c["label"], "rate_per_s": rate,
                "measured": r["slo_attainment"], "simulated": raw["attainment"],
                "step_speed": speed,
                "simulated_in_run_speed": in_run["attainment"] if in_run else None,
                "simulated_in_run_speed_p50_ttft_s": in_run["p50_ttft_s"] if in_run else None,
                "low_rate_step_speed": low_speed,
                "simulated_low_rate_speed": ahead["attainment"] if ahead else None,
                "measured_p50_ttft_s": r["ttft_s"]["median"], "simulated_p50_ttft_s": raw["p50_ttft_s"],
                "measured_p50_tpot_s": r["tpot_s"]["median"], "simulated_p50_tpot_s": raw["p50_tpot_s"],
                "measured_p50_first_gap_s": first_gap, "measured_p50_later_gaps_s": later_gaps,
                "errors": r["num_errors"],
            })  # fmt: skip
        summary[name] = {
            "placement": c["label"],
            "predicted_goodput_per_s": c["predicted_goodput_per_s"],
            "measured_goodput_per_s": report["goodput"]["rate_per_s"],
            "measured_note": report["goodput"]["note"],
            # the same interpolation over the same rates as the measured goodput
            "simulated_goodput_per_s": {
                key: find_goodput(
                    [(r["rate_per_s"], r[key]) for r in rows if r["cluster"] == name and r[key] is not None],
                    slo.attainment,
                ).rate_per_s
                for key in ("simulated", "simulated_low_rate_speed", "simulated_in_run_speed")
            },
            "calibration_rate_per_s": float(calib["results"][0]["rate_per_s"]),
            "load_avg": {"calibration": calib["load_avg"], "sweep": report["load_avg"]},
            "rank_cpu": {"calibration": calib.get("rank_cpu"), "sweep": report.get("rank_cpu")},
        }  # fmt: skip
    print_table(rows, summary, plan)
    result = {"benchmark": "placement_validate", "date": time.strftime("%Y-%m-%d"),
              "machine": os.uname().nodename, "cpus": os.cpu_count(), "args": vars(args),
              "plan": plan, "rates": rates, "rows": rows, "summary": summary}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


def _rate(x: float | None) -> str:
    return "none" if x is None else f"{x:.2f} req/s"


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any], plan: dict[str, Any]) -> None:
    slo = plan["slo"]
    print(f"SLO: TTFT {slo['ttft_s']} s, TPOT {slo['tpot_s']} s at 90%")
    print("| cluster | rate (req/s) | measured | simulated (raw profile) | simulated (low-rate "
          "run's step speed) | simulated (in-run step speed) | in-run step speed "
          "| p50 TTFT meas/sim/in-run (ms) | p50 TPOT meas/sim (ms) "
          "| p50 first gap / later gaps (ms) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def vs(x: float | None, m: float) -> str:
        return "-" if x is None else f"{x:.3f} ({100 * (x - m):+.0f})"

    def ms(x: float | None, digits: int = 0) -> str:
        return "-" if x is None else f"{1e3 * x:.{digits}f}"

    for r in rows:
        m = r["measured"]
        speed = ", ".join(f"{k} ×{v:.2f}" for k, v in (r.get("step_speed") or {}).items())
        print(f"| {r['placement']} | {r['rate_per_s']:g} | {m:.3f} | {vs(r['simulated'], m)} "
              f"| {vs(r.get('simulated_low_rate_speed'), m)} "
              f"| {vs(r.get('simulated_in_run_speed'), m)} | {speed or '-'} "
              f"| {ms(r['measured_p50_ttft_s'])} / {ms(r['simulated_p50_ttft_s'])} / "
              f"{ms(r.get('simulated_in_run_speed_p50_ttft_s'))} "
              f"| {ms(r['measured_p50_tpot_s'], 1)} / {ms(r['simulated_p50_tpot_s'], 1)} "
              f"| {ms(r['measured_p50_first_gap_s'])} / {ms(r['measured_p50_later_gaps_s'], 1)} |")  # fmt: skip
    for name, s in summary.items():
        measured = s["measured_goodput_per_s"]
        shown = (
            "none"
            if measured is None or (isinstance(measured, float) and math.isnan(measured))
            else f"{measured:.2f}"
        )
        print(f"{name}: {s['placement']} predicted {s['predicted_goodput_per_s']:.2f} req/s, "
              f"measured {shown} req/s ({s['measured_note']})")  # fmt: skip
        sim = s.get("simulated_goodput_per_s", {})
        print("  simulated over the same rates: raw profile "
              f"{_rate(sim.get('simulated'))}, low-rate run's step speed "
              f"{_rate(sim.get('simulated_low_rate_speed'))}, in-run step speed "
              f"{_rate(sim.get('simulated_in_run_speed'))}")  # fmt: skip
        low = next((r.get("low_rate_step_speed") for r in rows if r["cluster"] == name), None)
        if low:
            print(
                "  step speed in the low-rate run: "
                + ", ".join(f"{k} ×{v:.2f}" for k, v in low.items())
            )
        sweep = s["rank_cpu"]["sweep"] or {}
        ranks = {k: v for k, v in sweep.items() if k.startswith("rank")}
        if ranks:
            shares = ", ".join(
                f"{k} {v['cpu_share']:.2f} (engine thread {v.get('engine_cpu_share', math.nan):.2f})"
                for k, v in ranks.items()
            )
            print(f"  cpu share the ranks got during the sweep (ran / runnable): {shares}")
        if "router_cpu_s" in sweep and sweep["num_requests"]:
            n = sweep["num_requests"]
            client = sweep.get("client_measured_cpu_s", sweep["client_cpu_s"])
            measured = sweep.get("num_measured", n)
            print(f"  host CPU per request: router {1e3 * sweep['router_cpu_s'] / n:.1f} ms, "
                  f"bench client {1e3 * client / max(1, measured):.1f} ms (while measuring); instance threads "
                  "other than the engine's: " + ", ".join(
                      f"{k} {1e3 * v['other_threads_ran_s'] / n:.1f} ms" for k, v in ranks.items()
                  ))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
