"""Conversions between protocol messages and the engine's types, shared by router and instances.

Every conversion of user input raises ``ValueError`` naming the field, which the servers turn
into ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distserve._proto import generation_pb2, instance_pb2
from distserve.engine.kv_spec import KVCacheSpec
from distserve.engine.sampling_params import SamplingParams


def sampling_from_proto(msg: generation_pb2.SamplingOptions) -> SamplingParams:
    kwargs: dict[str, object] = {}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    if kwargs.get("top_k") == -1:
        kwargs["top_k"] = 0
    return SamplingParams(
        **kwargs,  # type: ignore[arg-type]
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        include_stop_str_in_output=msg.include_stop_str_in_output,
    )


def sampling_to_proto(p: SamplingParams) -> generation_pb2.SamplingOptions:
    msg = generation_pb2.SamplingOptions(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        include_stop_str_in_output=p.include_stop_str_in_output,
    )
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def layout_to_proto(spec: KVCacheSpec, model_fingerprint: str) -> instance_pb2.KVLayout:
    return instance_pb2.KVLayout(
        model=model_fingerprint,
        dtype=spec.dtype,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        block_size=spec.block_size,
    )


def layout_from_proto(msg: instance_pb2.KVLayout) -> KVCacheSpec:
    return KVCacheSpec(
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        head_dim=msg.head_dim,
        block_size=msg.block_size,
        dtype=msg.dtype,
    )


def layout_mismatch(a: instance_pb2.KVLayout, b: instance_pb2.KVLayout) -> str | None:
    """A sentence naming the first field on which two layouts differ, or None."""
    for field in ("model", "dtype", "num_layers", "num_kv_heads", "head_dim", "block_size"):
        if getattr(a, field) != getattr(b, field):
            what = "model checkpoint" if field == "model" else field
            return f"{what} differs: {getattr(a, field)!r} here vs {getattr(b, field)!r} in the cluster"
    return None


def model_fingerprint(model_path: str | Path) -> str:
    """Identity of a checkpoint: its config and the head of every weight file.

    Two instances serving different weights (even with identical shapes) get different
    fingerprints, so KV computed by one is never decoded by the other.
    """
    root = Path(model_path)
    h = hashlib.sha256()
    config = json.loads((root / "config.json").read_text())
    h.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(root.glob("*.safetensors")):
        h.update(weights.name.encode())
        h.update(str(weights.stat().st_size).encode())
        with weights.open("rb") as f:
            h.update(f.read(1 << 20))
    return f"{config.get('architectures', ['?'])[0]}:{h.hexdigest()[:16]}"
