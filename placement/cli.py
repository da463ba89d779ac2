"""``distserve profile`` and ``distserve plan``: argument parsing and hand-off.

Owns the two subcommands' options and turning them into calls of ``profiler.run_profiler`` and
``planner.make_plan`` + ``output``. Heavy modules are imported inside the run functions so that
``distserve --help`` stays fast. Bad input raises ValueError, which ``distserve`` prints as one
line and exits 2.

    distserve profile --model PATH --tp 1,2 [--pp 1,2] [--quick] --out profile.json
    distserve plan --profile profile.json --model-name NAME --workload W \\
        --ttft-slo S --tpot-slo S [--attainment 0.9] --gpus-per-node M --nodes N \\
        [--rate R | --gpus G] [--network fast|slow] --out cluster.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _step_speed(text: str) -> tuple[tuple[str, float], ...]:
    """``prefill=1.2,decode=1.05``: per role, how many times the profile's step time."""
    pairs = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        role, sep, value = item.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if not sep or role not in ("prefill", "decode", "colocated") or not factor > 0:
            raise argparse.ArgumentTypeError(
                f"expected ROLE=FACTOR pairs (roles prefill, decode, colocated; factor > 0), "
                f"got {item!r}"
            )
        pairs.append((role, factor))
    if not pairs:
        raise argparse.ArgumentTypeError("expected ROLE=FACTOR pairs, got nothing")
    return tuple(pairs)


def _int_list(text: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
    return values


# ---------------------------------------------------------------- profile


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder to profile")
    p.add_argument("--model-name", default=None, help="name in the profile (default: folder name)")
    p.add_argument("--tp", type=_int_list, default=[1], help="tensor-parallel sizes, e.g. 1,2")
    p.add_argument(
        "--pp", type=_int_list, default=[1], help="pipeline sizes, e.g. 1,2 (tp x pp cores each)"
    )
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--quick", action="store_true", help="a small grid, one repeat (about a minute)")
    p.add_argument("--repeats", type=int, default=None, help="timings per grid point (median)")
    p.add_argument("--kv-cache-gib", type=float, default=0.5, help="CPU KV pool per rank")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="longest prompt profiled")
    p.add_argument("--max-batch-size", type=int, default=None, help="largest decode batch")
    p.add_argument(
        "--cores",
        type=lambda text: _int_list(text, minimum=0),
        default=None,
        help="CPU cores to pin ranks to, e.g. 0,1",
    )
    p.add_argument("--disable-tqdm", action="store_true")


def run_profile(args: argparse.Namespace) -> int:
    from placement.profile_format import save_profile
    from placement.profiler import ProfileOptions, run_profiler

    opts = ProfileOptions(
        model_path=args.model,
        model_name=args.model_name or Path(args.model).resolve().name,
        tps=tuple(args.tp),
        pps=tuple(args.pp),
        quick=args.quick,
        repeats=args.repeats,
        kv_cache_gib=args.kv_cache_gib,
        max_prompt_len=args.max_prompt_len,
        max_batch_size=args.max_batch_size,
        cores=tuple(args.cores) if args.cores else None,
        show_progress=not args.disable_tqdm,
    )
    profile, report = run_profiler(opts)
    save_profile(profile, args.out)
    print(report)
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------- plan


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help="our profile JSON, or DistServe's")
    p.add_argument(
        "--capacity-csv", default=None, help="DistServe KV capacity table (default: beside it)"
    )
    p.add_argument("--model-name", required=True, help="the model's name in the profile")
    p.add_argument(
        "--model-path", default=None, help="checkpoint the YAML names (default: profile's)"
    )
    p.add_argument(
        "--workload",
        required=True,
        help="sharegpt:PATH | mooncake:PATH | sharegpt-like | synthetic:in=D,out=D "
        "(D = N, uniform:LO:HI or lognormal:MEDIAN:SIGMA)",
    )
    p.add_argument("--num-requests", type=int, default=None, help="simulated requests (1500)")
    p.add_argument("--arrival-cv", type=float, default=1.0, help="Gamma arrivals; 1 = Poisson")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for ShareGPT lengths")
    p.add_argument("--ttft-slo", type=float, required=True, help="seconds")
    p.add_argument("--tpot-slo", type=float, required=True, help="seconds")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--nodes", type=int, default=1)
    sizing = p.add_mutually_exclusive_group()
    sizing.add_argument("--rate", type=float, default=None, help="req/s to serve (fewest GPUs)")
    sizing.add_argument("--gpus", type=int, default=None, help="GPUs to use (most goodput)")
    p.add_argument("--network", choices=["fast", "slow"], default="fast")
    p.add_argument("--max-pp", type=int, default=1, help="search pipeline parallelism up to this")
    p.add_argument("--rules", choices=["ours", "distserve"], default="ours")
    p.add_argument("--prefill-token-budget", type=int, default=2048)
    p.add_argument("--max-prefill-seqs", type=int, default=128)
    p.add_argument("--max-decode-batch", type=int, default=256)
    p.add_argument(
        "--step-speed",
        type=_step_speed,
        default=(),
        metavar="ROLE=X[,ROLE=X]",
        help="scale a role's profiled step times, e.g. prefill=1.2 when a short live run "
        "(DISTSERVE_TIMELINE) showed its steps taking 1.2x the profile's (docs/placement.md)",
    )
    p.add_argument("--intra-node-gbps", type=float, default=None, help="override (Gbit/s)")
    p.add_argument("--inter-node-gbps", type=float, default=None, help="override (Gbit/s)")
    p.add_argument("--out", required=True, help="cluster YAML to write")
    p.add_argument("--report", default=None, help="JSON report (default: OUT.report.json)")
    p.add_argument("--plot", default=None, help="attainment plot (default: OUT.png)")
    p.add_argument("--colocated-out", default=None, help="also write the colocated YAML here")
    p.add_argument("--quick", action="store_true", help="fewer simulated requests and units")
    p.add_argument("--jobs", type=int, default=1, help="processes for the rate searches")
    p.add_argument("--disable-tqdm", action="store_true")


def run_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from placement.evaluate import SLO, SimSettings
    from placement.output import (
        cluster_yaml,
        plot_attainment,
        summary_text,
        write_report,
        write_yaml,
    )
    from placement.planner import make_plan
    from placement.profile_format import load_profile
    from placement.search import DISTSERVE_RULES, OUR_RULES, ClusterShape, Links
    from placement.workload import parse_workload

    slo = SLO(args.ttft_slo, args.tpot_slo, args.attainment)
    shape = ClusterShape(args.gpus_per_node, args.nodes)
    profile = load_profile(args.profile, args.capacity_csv)
    model = profile.model(args.model_name)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        tokenizer = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    num_requests = args.num_requests or (500 if args.quick else 1500)
    workload = parse_workload(
        args.workload, num_requests, args.seed, args.arrival_cv, model.max_model_len, tokenizer
    )
    rules = DISTSERVE_RULES if args.rules == "distserve" else OUR_RULES
    if args.quick:
        rules = replace(rules, top_k=min(rules.top_k, 4))
    links = Links(
        args.intra_node_gbps * 1e9 / 8 if args.intra_node_gbps else profile.intra_node_bytes_per_s,
        args.inter_node_gbps * 1e9 / 8 if args.inter_node_gbps else profile.inter_node_bytes_per_s,
    )
    settings = SimSettings(
        prefill_token_budget=args.prefill_token_budget,
        max_prefill_seqs=args.max_prefill_seqs,
        max_decode_batch=args.max_decode_batch,
        step_speed=args.step_speed,
    )
    bar = None
    if not args.disable_tqdm:
        from tqdm import tqdm

        bar = tqdm(desc="planning", unit="search", file=sys.stderr, leave=False)

    def progress(message: str) -> None:
        if bar is not None:
            bar.set_description(message)
            bar.update(1)

    try:
        plan = make_plan(
            profile,
            args.model_name,
            workload,
            slo,
            shape,
            args.network,
            args.rate,
            args.gpus,
            rules,
            settings,
            args.max_pp,
            links,
            progress,
            args.jobs,
        )
    finally:
        if bar is not None:
            bar.close()
    model_path = args.model_path or model.path or args.model_name
    kv_gib = model.kv_cache_memory_gib
    header = f"written by distserve plan\n{summary_text(plan)}"
    data = cluster_yaml(plan, plan.chosen.placement, model_path, profile.device, kv_gib)
    write_yaml(data, args.out, header)
    if args.colocated_out and plan.colocated is not None:
        coloc = cluster_yaml(plan, plan.colocated.placement, model_path, profile.device, kv_gib)
        write_yaml(coloc, args.colocated_out, "colocated alternative written by distserve plan")
    out = Path(args.out)
    write_report(plan, args.report or out.with_suffix(".report.json"))
    plot_attainment(plan, args.plot or out.with_suffix(".png"))
    print(summary_text(plan))
    print(f"wrote {args.out}")
    return 0
