"""``make_tiny_model``: write a small random Hugging Face checkpoint for tests, demos and benchmarks.

The folder it writes is a real checkpoint that ``transformers`` loads with ``AutoTokenizer`` and
``AutoModelForCausalLM``::

    config.json                    LlamaForCausalLM | MistralForCausalLM | Qwen2ForCausalLM
    generation_config.json         bos / eos (<|eos|> and <|im_end|>) / pad ids
    model.safetensors              or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json                 byte-level BPE (see tiny_tokenizer.py)
    tokenizer_config.json          special tokens and a ChatML-like chat template

Weights are drawn from a seeded generator: linear layers with std ``1 / sqrt(fan_in)`` (so
activations and attention scores are of order 1: attention is far from uniform, which keeps
masking bugs visible in tests), norms near 1, biases small, and the embedding / LM head with std
``2 / sqrt(hidden)`` so that logits are peaked and greedy decoding wanders over many tokens
instead of repeating one, with tied embeddings too. Mistral is written with ``sliding_window=None`` (our loader
rejects windows shorter than the context, see ``config.py``); Qwen2 always has q/k/v biases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from distserve.model.tiny_tokenizer import (
    BOS,
    EOS,
    IM_END,
    PAD,
    build_tokenizer,
    save_tokenizer,
)

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

PRESETS: dict[str, dict[str, int]] = {
    # fast unit tests
    "tiny": {
        "layers": 2,
        "hidden_size": 64,
        "heads": 4,
        "kv_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 2048,
    },
    # ~76M parameters: CPU benchmarks
    "small-100m": {
        "layers": 12,
        "hidden_size": 768,
        "heads": 12,
        "kv_heads": 4,
        "intermediate_size": 2048,
        "max_position_embeddings": 2048,
    },
}

# every keyword make_tiny_model accepts besides the preset's shape keys, with its default
_EXTRA_DEFAULTS: dict[str, Any] = {
    "pad_vocab_to_multiple_of": 1,  # round vocab_size up (rows past the tokenizer are unused)
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,  # e.g. {"rope_type": "linear", "factor": 2.0}
    "attention_bias": False,  # llama only: biases on q/k/v/o
    "dtype": "float32",  # "float32" | "bfloat16" | "float16"
    "shard_size": None,  # bytes per safetensors file; set to write a sharded checkpoint
}
TINY_OVERRIDE_KEYS = frozenset(PRESETS["tiny"]) | frozenset(_EXTRA_DEFAULTS)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    preset: str = "tiny",
    **overrides: Any,
) -> Path:
    """Write a random checkpoint of ``arch`` shaped by ``preset`` (+ ``overrides``) to ``out_dir``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: unknown {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r}; choose from {', '.join(PRESETS)}")
    spec = {**PRESETS[preset], **_EXTRA_DEFAULTS}
    for key, value in overrides.items():
        if key not in TINY_OVERRIDE_KEYS:
            raise ValueError(
                f"{key}: unknown override; allowed: {', '.join(sorted(TINY_OVERRIDE_KEYS))}"
            )
        spec[key] = value
    _validate(arch, spec)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer("qwen2" if arch == "qwen2" else "byte_level")
    multiple = spec["pad_vocab_to_multiple_of"]
    vocab_size = -(-tokenizer.get_vocab_size() // multiple) * multiple
    special = {
        name: _token_id(tokenizer, tok) for name, tok in (("bos", BOS), ("eos", EOS), ("pad", PAD))
    }

    _hf_config(arch, spec, vocab_size, special).save_pretrained(out)
    generation = {
        "bos_token_id": special["bos"],
        "eos_token_id": [special["eos"], _token_id(tokenizer, IM_END)],
        "pad_token_id": special["pad"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_tokenizer(tokenizer, out, spec["max_position_embeddings"])
    tensors = _random_weights(arch, spec, vocab_size, seed)
    _save_weights(tensors, out, spec["shard_size"])
    return out


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    assert token_id is not None, f"{token} missing from the tiny tokenizer"
    return token_id


def _validate(arch: str, spec: dict[str, Any]) -> None:
    for key in (*PRESETS["tiny"], "pad_vocab_to_multiple_of"):
        if not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] <= 0:
            raise ValueError(f"{key}: must be a positive int, got {spec[key]!r}")
    if spec["hidden_size"] % spec["heads"] or (spec["hidden_size"] // spec["heads"]) % 2:
        raise ValueError(
            f"hidden_size: {spec['hidden_size']} must split into {spec['heads']} even-sized heads"
        )
    if spec["heads"] % spec["kv_heads"]:
        raise ValueError(f"kv_heads: {spec['kv_heads']} must divide heads={spec['heads']}")
    if spec["dtype"] not in _DTYPES:
        raise ValueError(f"dtype: {spec['dtype']!r} is not one of {', '.join(_DTYPES)}")
    for key in ("tie_word_embeddings", "attention_bias"):
        if not isinstance(spec[key], bool):
            raise ValueError(f"{key}: must be a bool, got {spec[key]!r}")
    if spec["attention_bias"] and arch != "llama":
        raise ValueError(
            f"attention_bias: only configurable for llama (qwen2 always has q/k/v bias), not {arch}"
        )
    if not isinstance(spec["rope_theta"], (int, float)) or spec["rope_theta"] <= 0:
        raise ValueError(f"rope_theta: must be a positive number, got {spec['rope_theta']!r}")
    if spec["rope_scaling"] is not None and not isinstance(spec["rope_scaling"], dict):
        raise ValueError(f"rope_scaling: must be a dict or None, got {spec['rope_scaling']!r}")
    shard = spec["shard_size"]
    if shard is not None and (not isinstance(shard, int) or shard <= 0):
        raise ValueError(f"shard_size: must be a positive number of bytes or None, got {shard!r}")


def _hf_config(arch: str, spec: dict[str, Any], vocab_size: int, special: dict[str, int]) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": spec["hidden_size"],
        "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"],
        "num_key_value_heads": spec["kv_heads"],
        "max_position_embeddings": spec["max_position_embeddings"],
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": spec["tie_word_embeddings"],
        "rope_theta": float(spec["rope_theta"]),
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "pad_token_id": special["pad"],
        "dtype": spec["dtype"],
    }
    if spec["rope_scaling"] is not None:
        common["rope_scaling"] = dict(spec["rope_scaling"])
    config: LlamaConfig | MistralConfig | Qwen2Config
    if arch == "llama":
        config = LlamaConfig(**common, attention_bias=spec["attention_bias"])
    elif arch == "mistral":
        config = MistralConfig(**common, sliding_window=None)
    else:
        config = Qwen2Config(**common, use_sliding_window=False)
    config.architectures = [ARCHITECTURES[arch]]
    return config


def _random_weights(
    arch: str, spec: dict[str, Any], vocab_size: int, seed: int
) -> dict[str, torch.Tensor]:
    """HF-named tensors in a fixed order, so a seed always gives the same checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    head_dim = hidden // spec["heads"]
    q_rows, kv_rows = spec["heads"] * head_dim, spec["kv_heads"] * head_dim
    has_qkv_bias = arch == "qwen2" or spec["attention_bias"]
    # Logits should have std ~2. Untied: a 2/sqrt(hidden) LM head does it. Tied: the LM head is
    # the embedding, and a large embedding makes every token predict itself; so the embedding is
    # kept small next to the layers' output and the final norm's gain scales the logits up.
    is_tied = spec["tie_word_embeddings"]
    vocab_std = (0.5 if is_tied else 2.0) / hidden**0.5
    final_norm_gain = 4.0 if is_tied else 1.0

    def normal(*shape: int, std: float | None = None, mean: float = 0.0) -> torch.Tensor:
        std = (
            shape[-1] ** -0.5 if std is None else std
        )  # default: a linear layer of fan_in shape[-1]
        return torch.randn(*shape, generator=gen) * std + mean

    tensors = {"model.embed_tokens.weight": normal(vocab_size, hidden, std=vocab_std)}
    for i in range(spec["layers"]):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            tensors[f"{p}.self_attn.{name}.weight"] = normal(rows, hidden)
            if has_qkv_bias:
                tensors[f"{p}.self_attn.{name}.bias"] = normal(rows, std=0.1)
        tensors[f"{p}.self_attn.o_proj.weight"] = normal(hidden, q_rows)
        if spec["attention_bias"]:
            tensors[f"{p}.self_attn.o_proj.bias"] = normal(hidden, std=0.1)
        tensors[f"{p}.post_attention_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        tensors[f"{p}.mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[f"{p}.mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[f"{p}.mlp.down_proj.weight"] = normal(hidden, inter)
    tensors["model.norm.weight"] = normal(hidden, std=0.1, mean=final_norm_gain)
    if not is_tied:
        tensors["lm_head.weight"] = normal(vocab_size, hidden, std=vocab_std)
    dtype = _DTYPES[spec["dtype"]]
    return {name: t.to(dtype).contiguous() for name, t in tensors.items()}


def _save_weights(tensors: dict[str, torch.Tensor], out: Path, shard_size: int | None) -> None:
    metadata = {"format": "pt"}
    if shard_size is None:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > shard_size:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
