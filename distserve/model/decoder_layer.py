"""One pre-norm decoder block shared by the Llama, Mistral and Qwen2 families.

    h ──► RMSNorm ──► attention (GQA, rotary, paged KV) ──► + ──► RMSNorm ──► SwiGLU MLP ──► +
    └──────────────── residual ──────────────────────────┘ └───────── residual ───────────┘

The families differ only in configuration (biases, head counts, rotary scaling), all of which
arrive through :class:`ModelConfig`. Tensor parallelism: q/k/v and gate/up are column-parallel
(split by heads / by intermediate features), o and down are row-parallel (all-reduced).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distserve.model.attention import AttentionBackend
from distserve.model.config import ModelConfig
from distserve.model.layers.linear import ColumnParallelLinear, RowParallelLinear, RowRange
from distserve.model.layers.norm import RMSNorm
from distserve.model.layers.rotary import apply_rotary
from distserve.model.parallel import TensorParallelGroup


class DecoderAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        prefix: str,
        tp: TensorParallelGroup,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        hd = config.head_dim
        q_start, q_end = tp.split(config.num_heads, "num_attention_heads")
        kv_start, kv_end = config.kv_head_range(tp)
        self.num_local_heads = q_end - q_start
        self.num_local_kv_heads = kv_end - kv_start
        self.head_dim = hd
        self.scale = hd**-0.5
        self.backend = backend
        q_rows, kv_rows = config.num_heads * hd, config.num_kv_heads * hd
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size,
            [
                RowRange(f"{prefix}.q_proj", q_rows, q_start * hd, q_end * hd),
                RowRange(f"{prefix}.k_proj", kv_rows, kv_start * hd, kv_end * hd),
                RowRange(f"{prefix}.v_proj", kv_rows, kv_start * hd, kv_end * hd),
            ],
            config.has_qkv_bias,
            dtype,
            device,
        )
        self.o_proj = RowParallelLinear(
            f"{prefix}.o_proj",
            q_rows,
            config.hidden_size,
            (q_start * hd, q_end * hd),
            config.has_o_bias,
            tp,
            dtype,
            device,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache_layer: torch.Tensor,
        plan: Any,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.output_sizes, dim=-1)
        q = apply_rotary(q.view(num_tokens, self.num_local_heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(num_tokens, self.num_local_kv_heads, self.head_dim), cos, sin)
        v = v.view(num_tokens, self.num_local_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, kv_cache_layer, plan, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_local_heads * self.head_dim))


class SwiGLUMLP(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        prefix: str,
        tp: TensorParallelGroup,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        size = config.intermediate_size
        start, end = tp.split(size, "intermediate_size")
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size,
            [
                RowRange(f"{prefix}.gate_proj", size, start, end),
                RowRange(f"{prefix}.up_proj", size, start, end),
            ],
            config.has_mlp_bias,
            dtype,
            device,
        )
        self.down_proj = RowParallelLinear(
            f"{prefix}.down_proj",
            size,
            config.hidden_size,
            (start, end),
            config.has_mlp_bias,
            tp,
            dtype,
            device,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        tp: TensorParallelGroup,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(f"{prefix}.input_layernorm", hidden, eps, dtype, device)
        self.self_attn = DecoderAttention(config, f"{prefix}.self_attn", tp, backend, dtype, device)
        self.post_attention_layernorm = RMSNorm(
            f"{prefix}.post_attention_layernorm", hidden, eps, dtype, device
        )
        self.mlp = SwiGLUMLP(config, f"{prefix}.mlp", tp, dtype, device)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache_layer: torch.Tensor,
        plan: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mlp output, residual)``; their sum is this layer's output."""
        x, residual = self.input_layernorm(hidden, residual)
        x = self.self_attn(x, cos, sin, kv_cache_layer, plan)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual
