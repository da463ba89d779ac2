"""Rotary scalings against Hugging Face's own rotary modules, and the backend registry."""

from __future__ import annotations

import pytest
import torch

from distserve.model.attention import SdpaBackend, available_backends, get_backend
from distserve.model.layers.rotary import RopeConfig, RotaryEmbedding

HEAD_DIM = 16


def _hf_config(rope_parameters: dict[str, object]):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
    )


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ],
)
def test_rotary_matches_hf_token_by_token(rope_parameters: dict[str, object]) -> None:
    """Each position, run alone as in HF incremental decoding, also past max positions (64)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = _hf_config(rope_parameters)
    ours = RotaryEmbedding(RopeConfig.from_hf(hf_config), HEAD_DIM)
    theirs = LlamaRotaryEmbedding(hf_config)
    x = torch.zeros(1, 1, HEAD_DIM)
    positions = list(range(0, 200, 7))
    cos, sin = ours(torch.tensor(positions), torch.float32)
    for row, pos in enumerate(positions):
        hf_cos, hf_sin = theirs(x, torch.tensor([[pos]]))
        half = HEAD_DIM // 2
        torch.testing.assert_close(cos[row], hf_cos[0, 0, :half], atol=1e-5, rtol=0)
        torch.testing.assert_close(sin[row], hf_sin[0, 0, :half], atol=1e-5, rtol=0)


def test_scaled_rope_differs_from_default() -> None:
    positions = torch.arange(100)
    default = RotaryEmbedding(RopeConfig.from_hf(_hf_config({"rope_type": "default"})), HEAD_DIM)
    for params in ({"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 4.0}):
        scaled = RotaryEmbedding(RopeConfig.from_hf(_hf_config(params)), HEAD_DIM)
        assert not torch.allclose(
            scaled(positions, torch.float32)[0], default(positions, torch.float32)[0]
        )


def test_backend_registry_on_cpu() -> None:
    assert available_backends("cpu") == ["sdpa"]
    assert isinstance(get_backend("auto", "cpu"), SdpaBackend)
    with pytest.raises(ValueError, match="flash_attn"):
        get_backend("flash_attn", "cpu")
    with pytest.raises(ValueError, match="bogus"):
        get_backend("bogus", "cpu")
