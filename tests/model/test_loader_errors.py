"""load_model rejects what it cannot run, with a ValueError that names the culprit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distserve.model.config import ModelConfig
from distserve.model.loader import load_model
from distserve.model.parallel import TensorParallelGroup
from distserve.model.tiny_model import make_tiny_model


def _edit_config(model_dir: Path, **changes: object) -> None:
    file = model_dir / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def _edit_weights(model_dir: Path, drop: str | None = None, add: str | None = None) -> None:
    file = model_dir / "model.safetensors"
    tensors = load_file(str(file))
    if drop is not None:
        del tensors[drop]
    if add is not None:
        tensors[add] = torch.zeros(3)
    save_file(tensors, str(file))


def test_unknown_architecture(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path)
    _edit_config(model_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model(model_dir, dtype=torch.float32)


@pytest.mark.parametrize("rope_type", ["yarn", "longrope"])
def test_unsupported_rope_type(tmp_path: Path, rope_type: str) -> None:
    params = {
        "rope_type": rope_type,
        "rope_theta": 10000.0,
        "factor": 2.0,
        "original_max_position_embeddings": 256,
        "short_factor": [1.0] * 8,
        "long_factor": [1.0] * 8,
    }
    model_dir = make_tiny_model(tmp_path)
    _edit_config(model_dir, rope_parameters=params, rope_scaling=params)
    with pytest.raises(ValueError, match=rope_type):
        load_model(model_dir, dtype=torch.float32)


def test_missing_tensor(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path)
    _edit_weights(model_dir, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(model_dir, dtype=torch.float32)


def test_unexpected_tensor(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path)
    _edit_weights(model_dir, add="model.layers.0.extra_gate.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.extra_gate\.weight"):
        load_model(model_dir, dtype=torch.float32)


def test_tensor_shape_disagreeing_with_config(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path)
    _edit_config(model_dir, intermediate_size=96)
    with pytest.raises(ValueError, match=r"gate_proj\.weight.*shape"):
        load_model(model_dir, dtype=torch.float32)


def test_sliding_window_smaller_than_context(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="mistral")
    _edit_config(model_dir, sliding_window=128)
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig.from_pretrained(model_dir)
    _edit_config(model_dir, sliding_window=4096)  # never masks within 2048 positions: accepted
    assert ModelConfig.from_pretrained(model_dir).max_position_embeddings == 2048


def test_unsupported_activation_dtype_backend_and_tp(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(model_dir, dtype=torch.int8)
    with pytest.raises(ValueError, match="nonexistent"):
        load_model(model_dir, dtype=torch.float32, attention_backend="nonexistent")
    with pytest.raises(ValueError, match="flash_attn"):
        load_model(model_dir, dtype=torch.float32, attention_backend="flash_attn")
    with pytest.raises(ValueError, match="num_attention_heads"):
        load_model(model_dir, dtype=torch.float32, tp=TensorParallelGroup(rank=0, size=3))
    _edit_config(model_dir, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        load_model(model_dir, dtype=torch.float32)
