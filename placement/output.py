"""What a plan writes: the cluster YAML, a JSON report, a text summary and an attainment plot.

Owns turning a :class:`~placement.planner.Plan` into files. The YAML is validated with the
launcher's own ``cluster_config_from_dict`` before it is written, so ``distserve launch`` runs
it as is. On a CPU profile (one pinned core = one device) each instance gets its own cores and
one thread per rank, as the profiler measured it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from distserve.launch.cluster_config import cluster_config_from_dict
from placement.evaluate import Placement
from placement.planner import Plan
from placement.workload import BLOCK_SIZE


def cluster_yaml(
    plan: Plan,
    placement: Placement,
    model_path: str,
    device: str,
    kv_cache_memory_gib: float | None,
) -> dict[str, Any]:
    """The cluster config of ``placement`` (validated; raises ConfigError if it is not)."""
    s, is_cpu = plan.settings, device == "cpu"
    next_core = 0

    def pool(cfg: Any, count: int, **limits: int) -> dict[str, Any]:
        nonlocal next_core
        if cfg.pp != 1:
            raise ValueError(f"{cfg} needs pipeline parallelism, which the engine cannot run yet")
        out: dict[str, Any] = {"instances": count, "tp": cfg.tp, **limits}
        if is_cpu:
            cores = []
            for _ in range(count):
                cores.append(list(range(next_core, next_core + cfg.tp)))
                next_core += cfg.tp
            out.update(num_threads=1, cpu_cores=cores)
        return out

    data: dict[str, Any] = {
        "model": model_path,
        "device": "cpu" if is_cpu else "cuda",
        "router": {"policy": s.policy},
    }
    if placement.colocated is not None:
        data["colocated"] = pool(
            placement.colocated,
            placement.num_colocated,
            max_num_batched_tokens=plan.colocated_budget,
            max_num_seqs=s.max_decode_batch,
        )
    else:
        data["prefill"] = pool(
            placement.prefill,
            placement.num_prefill,
            max_num_batched_tokens=s.prefill_token_budget,
            max_num_seqs=s.max_prefill_seqs,
        )
        data["decode"] = pool(
            placement.decode, placement.num_decode, max_num_seqs=s.max_decode_batch
        )
    kv: dict[str, Any] = {"block_size": BLOCK_SIZE}
    if is_cpu and kv_cache_memory_gib:
        kv["cpu_memory_gib"] = kv_cache_memory_gib
    data["kv_cache"] = kv
    data["transfer"] = {"backend": "gloo" if is_cpu else "nccl"}
    data["slo"] = {
        "ttft_s": plan.slo.ttft_s,
        "tpot_s": plan.slo.tpot_s,
        "attainment": plan.slo.attainment,
    }
    cluster_config_from_dict(data)  # the launcher's validator: raises ConfigError naming the key
    return data


def write_yaml(data: dict[str, Any], path: str | Path, header: str) -> None:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(comment + yaml.safe_dump(data, sort_keys=False))


def report_dict(plan: Plan) -> dict[str, Any]:
    def sized(s: Any) -> dict[str, Any] | None:
        if s is None:
            return None
        return {
            "placement": str(s.placement),
            "num_gpus": s.placement.num_gpus,
            "predicted_goodput_per_s": s.predicted_rate_per_s,
            "predicted_goodput_per_gpu": s.per_gpu,
            "transfer_bytes_per_s": s.placement.transfer_bytes_per_s,
            "note": s.note,
        }

    return {
        "model": plan.model_name,
        "slo": vars(plan.slo),
        "cluster": {"gpus_per_node": plan.shape.gpus_per_node, "nodes": plan.shape.num_nodes},
        "network": plan.network,
        "rules": vars(plan.rules),
        "settings": vars(plan.settings),
        "workload": plan.workload,
        "chosen": sized(plan.chosen),
        "unit": {
            "placement": str(plan.unit.placement),
            "goodput_per_s": plan.unit.rate_per_s,
            "simulated_goodput_per_s": plan.unit.goodput.rate_per_s,
            "link_cap_per_s": plan.unit.link_cap_per_s,
            "goodput_per_gpu": plan.unit.per_gpu,
            "estimate_per_s": plan.unit.estimate_per_s,
            "curve": plan.unit.goodput.points,
        },
        "best_with_pipeline_parallelism": sized(plan.best_any_pp),
        "colocated": sized(plan.colocated),
        "colocated_unit": None
        if plan.colocated_unit is None
        else {
            "placement": str(plan.colocated_unit.placement),
            "token_budget": plan.colocated_budget,
            "goodput_per_gpu": plan.colocated_unit.per_gpu,
            "curve": plan.colocated_unit.goodput.points,
        },
        "candidates": [
            {
                "placement": str(v.placement),
                "num_gpus": v.placement.num_gpus,
                "estimate_per_s": v.estimate_per_s,
                "goodput_per_s": v.rate_per_s,
                "simulated_goodput_per_s": v.goodput.rate_per_s,
                "link_cap_per_s": v.link_cap_per_s,
                "goodput_per_gpu": v.per_gpu,
            }
            for v in plan.search.verified
        ],
        "phase_goodput": {
            "prefill": {str(k): v for k, v in plan.search.prefill_goodput.items()},
            "decode": {f"{k[0]}@{k[1]:.3g}B/s": v for k, v in plan.search.decode_goodput.items()},
        },
        "distribution_at_predicted_goodput": plan.distribution,
        "layout": [list(n) for n in plan.layout.nodes],
        "notes": plan.notes,
        "num_simulations": plan.num_simulations,
        "planning_s": plan.planning_s,
    }


def summary_text(plan: Plan) -> str:
    c, u = plan.chosen, plan.unit
    lines = [
        f"model {plan.model_name}; SLO TTFT {plan.slo.ttft_s:g} s, TPOT {plan.slo.tpot_s:g} s at "
        f"{plan.slo.attainment:.0%}; {plan.shape.num_nodes} node(s) × {plan.shape.gpus_per_node} "
        f"GPUs, {plan.network} network",
        f"chosen:    {c.placement}  ({c.placement.num_gpus} GPUs) — predicted goodput "
        f"{c.predicted_rate_per_s:.2f} req/s, {c.per_gpu:.3f} req/s per GPU",
        f"  unit {u.placement}: goodput {u.rate_per_s:.2f} req/s "
        f"({u.per_gpu:.3f} per GPU; estimate from the phases {u.estimate_per_s:.2f})",
    ]
    if plan.settings.step_speed:
        scaled = ", ".join(f"{role} ×{f:g}" for role, f in plan.settings.step_speed)
        lines.insert(1, f"step times scaled from the profile's (--step-speed): {scaled}")
    if plan.colocated is not None:
        col = plan.colocated
        lines.append(
            f"colocated: {col.placement} — {col.predicted_rate_per_s:.2f} req/s, "
            f"{col.per_gpu:.3f} req/s per GPU (token budget {plan.colocated_budget})"
        )
    else:
        lines.append("colocated: no colocated instance meets the target at any rate")
    d = plan.distribution
    lines.append(
        f"at {d['rate_per_s']:.2f} req/s the chosen cluster simulates attainment {d['attainment']:.3f}"
        f" (TTFT p50/p90/p99 {d['p50_ttft_s']:.3f}/{d['p90_ttft_s']:.3f}/{d['p99_ttft_s']:.3f} s,"
        f" TPOT {d['p50_tpot_s']:.4f}/{d['p90_tpot_s']:.4f}/{d['p99_tpot_s']:.4f} s)"
    )
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"{plan.num_simulations} simulations in {plan.planning_s:.1f} s")
    return "\n".join(lines)


def plot_attainment(plan: Plan, path: str | Path) -> None:
    """Attainment vs request rate per GPU: the chosen unit and the best colocated instance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curves = [(f"disaggregated {plan.unit.placement}", plan.unit)]
    if plan.colocated_unit is not None:
        curves.append((f"colocated {plan.colocated_unit.placement}", plan.colocated_unit))
    for label, v in curves:
        pts = v.goodput.points
        ax.plot([r / v.placement.num_gpus for r, _ in pts], [a for _, a in pts], "o-", label=label)
        ax.axvline(v.per_gpu, ls=":", color=ax.lines[-1].get_color())
    ax.axhline(plan.slo.attainment, ls="--", color="grey", label="target")
    ax.set_xlabel("request rate per GPU (req/s)")
    ax.set_ylabel("SLO attainment (TTFT and TPOT)")
    ax.set_title(f"{plan.model_name}: TTFT ≤ {plan.slo.ttft_s:g} s, TPOT ≤ {plan.slo.tpot_s:g} s")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(plan: Plan, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report_dict(plan), indent=1, default=str))
