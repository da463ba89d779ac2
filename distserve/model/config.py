"""What the model code needs to know about a checkpoint, read once from its folder and validated.

Owns: the table of supported Hugging Face architectures and how their configs differ (biases,
sliding windows), reading ``config.json`` + ``generation_config.json`` into a frozen
:class:`ModelConfig`, and rejecting anything our decoder does not implement with a ``ValueError``
that names the field. Does not own the layer code (``decoder_layer.py``) or weight files
(``weights.py``).

Sliding-window attention is not implemented: a Mistral/Qwen2 config whose window is smaller than
``max_position_embeddings`` is rejected as unsupported (a window at least that large never masks
anything, so it is accepted and ignored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distserve.engine.kv_spec import KVCacheSpec
from distserve.model.layers.rotary import RopeConfig
from distserve.model.parallel import TensorParallelGroup

# architecture name in config.json → model family
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # e.g. "LlamaForCausalLM"
    hf_config: Any  # the transformers PretrainedConfig it was read from
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int  # query heads of the whole model
    num_kv_heads: int  # key/value heads of the whole model (== num_heads: MHA, 1: MQA)
    head_dim: int
    vocab_size: int  # rows of the embedding (may exceed the tokenizer's vocabulary)
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    has_qkv_bias: bool
    has_o_bias: bool
    has_mlp_bias: bool
    eos_token_ids: tuple[int, ...]  # generation_config's first, then config.json's
    bos_token_id: int | None
    torch_dtype: torch.dtype  # dtype the checkpoint was saved in

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        from transformers import AutoConfig

        path = Path(path)
        config_file = path / "config.json"
        if not config_file.exists():
            raise ValueError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
        architectures = json.loads(config_file.read_text()).get("architectures") or []
        if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {architectures!r} in {config_file}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hf = AutoConfig.from_pretrained(path)
        return cls.from_hf(architectures[0], hf, _read_generation_config(path))

    @classmethod
    def from_hf(cls, architecture: str, hf: Any, generation: dict[str, Any]) -> ModelConfig:
        family = SUPPORTED_ARCHITECTURES[architecture]
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act={act!r}; only 'silu' (SwiGLU) is implemented")
        _check_sliding_window(family, hf)
        num_heads = int(hf.num_attention_heads)
        num_kv_heads = int(getattr(hf, "num_key_value_heads", None) or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_heads} not a multiple of num_key_value_heads={num_kv_heads}"
            )
        head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // num_heads)
        has_llama_bias = family == "llama" and bool(getattr(hf, "attention_bias", False))
        eos_ids = _as_ids(generation.get("eos_token_id")) + _as_ids(
            getattr(hf, "eos_token_id", None)
        )
        bos = generation.get("bos_token_id", getattr(hf, "bos_token_id", None))
        return cls(
            architecture=architecture,
            hf_config=hf,
            num_layers=int(hf.num_hidden_layers),
            hidden_size=int(hf.hidden_size),
            intermediate_size=int(hf.intermediate_size),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            vocab_size=int(hf.vocab_size),
            max_position_embeddings=int(hf.max_position_embeddings),
            rms_norm_eps=float(hf.rms_norm_eps),
            rope=RopeConfig.from_hf(hf),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            has_qkv_bias=family == "qwen2" or has_llama_bias,
            has_o_bias=has_llama_bias,
            has_mlp_bias=family == "llama" and bool(getattr(hf, "mlp_bias", False)),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            bos_token_id=None if bos is None else int(bos),
            torch_dtype=_parse_dtype(
                getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
            ),
        )

    def kv_spec(self, block_size: int, dtype: str) -> KVCacheSpec:
        return KVCacheSpec(self.num_layers, self.num_kv_heads, self.head_dim, block_size, dtype)

    def kv_head_range(self, tp: TensorParallelGroup) -> tuple[int, int]:
        """Global KV heads held by ``tp.rank`` (the same rule the KV cache layout uses)."""
        return self.kv_spec(block_size=1, dtype="float32").kv_head_range(tp.rank, tp.size)

    def check_tensor_parallel(self, tp: TensorParallelGroup) -> None:
        """Raise ``ValueError`` if this model cannot be split over ``tp.size`` ranks."""
        tp.split(self.num_heads, "num_attention_heads")
        tp.split(self.intermediate_size, "intermediate_size")
        self.kv_head_range(tp)


def _check_sliding_window(family: str, hf: Any) -> None:
    window = getattr(hf, "sliding_window", None)
    if family == "qwen2" and not getattr(hf, "use_sliding_window", False):
        window = None
    if family == "llama" or window is None:
        return
    if int(window) < int(hf.max_position_embeddings):
        raise ValueError(
            f"unsupported sliding_window={window} smaller than max_position_embeddings="
            f"{hf.max_position_embeddings}: sliding-window attention is not implemented"
        )


def _read_generation_config(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json"
    return json.loads(file.read_text()) if file.exists() else {}


def _as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _parse_dtype(value: str | torch.dtype | None) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(
            f"unsupported checkpoint dtype {value!r}; expected one of {sorted(_DTYPES)}"
        )
    return _DTYPES[value]
