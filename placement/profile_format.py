"""Hardware profiles the planner reads: our JSON format, and DistServe's A100 profile.

Owns the in-memory profile (per model: KV bytes per token, per (tp, pp) latency coefficients and
KV capacity; per machine: link bandwidths), reading and writing it, and recognising DistServe's
own profile format so either file works wherever a profile is read. It does not measure anything
(``profiler.py``) nor plan (``search.py``).

Our format (``"format": "distserve-placement-profile"``, version 1)::

    {"format": ..., "version": 1, "device": "cpu" | "cuda", "device_name": str, "created": str,
     "bandwidth": {"intra_node_bytes_per_s": float, "inter_node_bytes_per_s": float,
                   "inter_node_measured": bool, "method": str},
     "models": {NAME: {"path": str | null, "kv_bytes_per_token": int, "max_model_len": int | null,
                       "kv_cache_memory_gib": float | null,
                       "configs": [{"tp", "pp", "prefill": [a, b, c], "decode_small": [a, b, c],
                                    "decode_large": [a, b, c], "large_batch_threshold": int,
                                    "kv_capacity_tokens": int, "stage_overhead_ms": float,
                                    "fit": {...errors...}, "samples": {...raw timings...}}]}}}

Times are milliseconds with the meaning of ``latency_model.py``. DistServe's format is
``{model: {tp: {"prefill", "decoding_smallbs", "decoding_largebs", ...}}}``; its KV capacities
come from ``distserve_a100_max_num_tokens.csv`` beside it, KV bytes per token from the OPT
shapes below, and bandwidths from its paper's testbed (stated in ``DISTSERVE_A100_BANDWIDTH``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from placement.latency_model import Coeffs, LatencyModel

FORMAT = "distserve-placement-profile"
VERSION = 1

# fp16 KV bytes per token = 2 (K, V) × layers × hidden × 2 bytes, from the OPT configs
OPT_KV_BYTES_PER_TOKEN = {
    "facebook/opt-13b": 2 * 40 * 5120 * 2,
    "facebook/opt-66b": 2 * 64 * 9216 * 2,
    "facebook/opt-175b": 2 * 96 * 12288 * 2,
}
# DistServe's testbed: NVLink inside a node (600 GB/s both directions: 300 GB/s each way) and a
# 25 Gbit/s network between nodes. Our assumption for its profile; override on the command line.
DISTSERVE_A100_BANDWIDTH = {"intra_node_bytes_per_s": 300e9, "inter_node_bytes_per_s": 25e9 / 8}
DISTSERVE_MAX_MODEL_LEN = 2048  # OPT's context window


@dataclass(frozen=True)
class ConfigProfile:
    """One (tp, pp) configuration of one model: step-time coefficients and KV capacity."""

    tp: int
    pp: int
    prefill: Coeffs
    decode_small: Coeffs
    decode_large: Coeffs
    kv_capacity_tokens: int
    large_batch_threshold: int = 95
    stage_overhead_ms: float = 0.0
    # False for our engine's profiles: it runs a step's pipeline stages one after another
    # (see LatencyModel.micro_batched); DistServe's data describes an engine that overlaps them.
    micro_batched: bool = True
    fit: dict[str, Any] = field(default_factory=dict, compare=False)  # fit errors, if fitted
    samples: dict[str, Any] = field(default_factory=dict, compare=False)  # raw timings

    def latency(self, pp: int | None = None) -> LatencyModel:
        return LatencyModel(
            prefill=self.prefill,
            decode_small=self.decode_small,
            decode_large=self.decode_large,
            large_batch_threshold=self.large_batch_threshold,
            tp=self.tp,
            pp=self.pp if pp is None else pp,
            stage_overhead_ms=self.stage_overhead_ms,
            micro_batched=self.micro_batched,
        )


@dataclass(frozen=True)
class ModelProfile:
    name: str
    kv_bytes_per_token: int  # whole model (all layers, all heads)
    configs: dict[tuple[int, int], ConfigProfile]
    path: str | None = None  # checkpoint folder (our profiles); the YAML's default model
    max_model_len: int | None = None
    kv_cache_memory_gib: float | None = None  # CPU profiles: the KV budget per rank measured
    capacity_table: dict[tuple[int, int], int] = field(default_factory=dict)  # extra (tp, pp)
    # The profiled engine takes KV pulls only between two steps (ours; see
    # ClusterSpec.pulls_between_steps). DistServe's data: False.
    pulls_between_steps: bool = False

    @property
    def tps(self) -> list[int]:
        return sorted({tp for tp, _ in self.configs})

    def latency(self, tp: int, pp: int = 1) -> LatencyModel:
        """Step times of (tp, pp): a fitted pp entry if there is one, else pp modelled on pp=1."""
        if (tp, pp) in self.configs:
            return self.configs[tp, pp].latency()
        if (tp, 1) not in self.configs:
            raise ValueError(f"{self.name}: no latency profile for TP={tp} (have TP {self.tps})")
        return self.configs[tp, 1].latency(pp=pp)

    def kv_capacity(self, tp: int, pp: int = 1) -> int | None:
        """KV tokens one (tp, pp) instance holds; None when the model does not fit there.

        Measured or tabulated values win; otherwise scaled from a measured pp=1 entry as
        per-device KV budget × devices (exact on CPU where the budget is fixed per rank)."""
        if self.capacity_table:
            value: int | None = self.capacity_table.get((tp, pp))
        elif (tp, pp) in self.configs:
            value = self.configs[tp, pp].kv_capacity_tokens
        elif (tp, 1) in self.configs:
            value = self.configs[tp, 1].kv_capacity_tokens * pp
        else:
            value = None
        return value if value is not None and value > 0 else None


@dataclass(frozen=True)
class HardwareProfile:
    models: dict[str, ModelProfile]
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    device: str = "cuda"
    device_name: str = ""
    source_format: str = FORMAT  # FORMAT or "distserve"
    meta: dict[str, Any] = field(default_factory=dict)

    def model(self, name: str) -> ModelProfile:
        if name not in self.models:
            raise ValueError(f"model {name!r} is not in the profile; it has: {sorted(self.models)}")
        return self.models[name]


# ---------------------------------------------------------------- reading


def load_profile(path: str | Path, capacity_csv: str | Path | None = None) -> HardwareProfile:
    """Read our profile or DistServe's (recognised by its shape)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"profile {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"profile {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return profile_from_dict(data)
    if _looks_like_distserve(data):
        csv_path = (
            Path(capacity_csv)
            if capacity_csv
            else path.with_name("distserve_a100_max_num_tokens.csv")
        )
        return from_distserve(data, csv_path if csv_path.exists() else None)
    raise ValueError(
        f"profile {path}: neither our format (format={FORMAT!r}) nor DistServe's "
        "({model: {tp: {prefill, decoding_smallbs, decoding_largebs}}})"
    )


def _looks_like_distserve(data: Any) -> bool:
    if not isinstance(data, dict) or not data:
        return False
    for per_tp in data.values():
        if not isinstance(per_tp, dict) or not per_tp:
            return False
        for tp, entry in per_tp.items():
            if not str(tp).isdigit() or not isinstance(entry, dict) or "prefill" not in entry:
                return False
    return True


def _coeffs(values: Any, where: str) -> Coeffs:
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ValueError(f"{where}: expected three coefficients [a, b, c], got {values!r}")
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def from_distserve(data: dict[str, Any], capacity_csv: Path | None) -> HardwareProfile:
    """DistServe's fitted coefficients (+ its KV capacity table when given)."""
    table: dict[str, dict[tuple[int, int], int]] = {}
    if capacity_csv is not None:
        with open(capacity_csv) as f:
            for row in csv.DictReader(f):
                table.setdefault(row["model"], {})[int(row["tp"]), int(row["pp"])] = int(
                    row["max_num_tokens"]
                )
    models = {}
    for name, per_tp in data.items():
        caps = table.get(name, {})
        configs = {}
        for tp_key, e in per_tp.items():
            tp = int(tp_key)
            cap = caps.get((tp, 1))
            if cap is None:  # fits only with pipeline stages (or no table): keep the latency
                cap = 0
            configs[tp, 1] = ConfigProfile(
                tp=tp,
                pp=1,
                prefill=_coeffs(e["prefill"], f"{name} TP={tp} prefill"),
                decode_small=_coeffs(e["decoding_smallbs"], f"{name} TP={tp} decoding_smallbs"),
                decode_large=_coeffs(e["decoding_largebs"], f"{name} TP={tp} decoding_largebs"),
                kv_capacity_tokens=cap,
                large_batch_threshold=int(e.get("decoding_large_small_bs_threshold", 95)),
            )
        if name not in OPT_KV_BYTES_PER_TOKEN:
            raise ValueError(f"DistServe profile model {name!r}: unknown KV bytes per token")
        models[name] = ModelProfile(
            name=name,
            kv_bytes_per_token=OPT_KV_BYTES_PER_TOKEN[name],
            configs=configs,
            path=name,
            max_model_len=DISTSERVE_MAX_MODEL_LEN,
            capacity_table={k: v for k, v in caps.items() if v > 0},
        )
    return HardwareProfile(
        models=models,
        device="cuda",
        device_name="A100-80GB (DistServe's profile)",
        source_format="distserve",
        intra_node_bytes_per_s=DISTSERVE_A100_BANDWIDTH["intra_node_bytes_per_s"],
        inter_node_bytes_per_s=DISTSERVE_A100_BANDWIDTH["inter_node_bytes_per_s"],
    )


def profile_from_dict(data: dict[str, Any]) -> HardwareProfile:
    if data.get("version") != VERSION:
        raise ValueError(f"profile version {data.get('version')!r} is not {VERSION}")
    bw = data["bandwidth"]
    models = {}
    for name, m in data["models"].items():
        configs = {}
        for c in m["configs"]:
            cfg = ConfigProfile(
                tp=int(c["tp"]),
                pp=int(c["pp"]),
                prefill=_coeffs(c["prefill"], f"{name} prefill"),
                decode_small=_coeffs(c["decode_small"], f"{name} decode_small"),
                decode_large=_coeffs(c["decode_large"], f"{name} decode_large"),
                kv_capacity_tokens=int(c["kv_capacity_tokens"]),
                large_batch_threshold=int(c.get("large_batch_threshold", 95)),
                stage_overhead_ms=float(c.get("stage_overhead_ms", 0.0)),
                micro_batched=bool(c.get("micro_batched", True)),
                fit=c.get("fit", {}),
                samples=c.get("samples", {}),
            )
            configs[cfg.tp, cfg.pp] = cfg
        models[name] = ModelProfile(
            name=name,
            kv_bytes_per_token=int(m["kv_bytes_per_token"]),
            configs=configs,
            path=m.get("path"),
            max_model_len=m.get("max_model_len"),
            kv_cache_memory_gib=m.get("kv_cache_memory_gib"),
            pulls_between_steps=bool(m.get("pulls_between_steps", True)),  # our engine's way
        )
    return HardwareProfile(
        models=models,
        intra_node_bytes_per_s=float(bw["intra_node_bytes_per_s"]),
        inter_node_bytes_per_s=float(bw["inter_node_bytes_per_s"]),
        device=data.get("device", "cpu"),
        device_name=data.get("device_name", ""),
        meta={k: data[k] for k in ("created", "host", "notes", "bandwidth") if k in data},
    )


# ---------------------------------------------------------------- writing


def profile_to_dict(profile: HardwareProfile) -> dict[str, Any]:
    models = {}
    for name, m in profile.models.items():
        models[name] = {
            "path": m.path,
            "kv_bytes_per_token": m.kv_bytes_per_token,
            "max_model_len": m.max_model_len,
            "kv_cache_memory_gib": m.kv_cache_memory_gib,
            "pulls_between_steps": m.pulls_between_steps,
            "configs": [
                {
                    "tp": c.tp,
                    "pp": c.pp,
                    "prefill": list(c.prefill),
                    "decode_small": list(c.decode_small),
                    "decode_large": list(c.decode_large),
                    "large_batch_threshold": c.large_batch_threshold,
                    "kv_capacity_tokens": c.kv_capacity_tokens,
                    "stage_overhead_ms": c.stage_overhead_ms,
                    "micro_batched": c.micro_batched,
                    "fit": c.fit,
                    "samples": c.samples,
                }
                for _, c in sorted(m.configs.items())
            ],
        }
    bandwidth = dict(profile.meta.get("bandwidth", {}))
    bandwidth.update(
        intra_node_bytes_per_s=profile.intra_node_bytes_per_s,
        inter_node_bytes_per_s=profile.inter_node_bytes_per_s,
    )
    out: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    out.update({k: v for k, v in profile.meta.items() if k != "bandwidth"})
    out.update(
        device=profile.device, device_name=profile.device_name, bandwidth=bandwidth, models=models
    )
    return out


def save_profile(profile: HardwareProfile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile_to_dict(profile), indent=1))
