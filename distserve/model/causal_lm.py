"""The causal language model the engine runs: embedding → decoder layers → final norm → LM head.

Owns the forward signature the model runner calls and the walk that fills every weight from a
checkpoint. Inputs arrive only as arguments (token ids, positions, the paged KV cache and the
step's attention metadata); there is no global forward context.
"""

from __future__ import annotations

import torch
from torch import nn

from distserve.model.attention import AttentionBackend
from distserve.model.attention_metadata import AttentionMetadata
from distserve.model.config import ModelConfig
from distserve.model.decoder_layer import DecoderLayer
from distserve.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distserve.model.layers.norm import RMSNorm
from distserve.model.layers.rotary import RotaryEmbedding
from distserve.model.parallel import TensorParallelGroup
from distserve.model.weights import CheckpointModule, CheckpointReader


class CausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        tp: TensorParallelGroup,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        config.check_tensor_parallel(tp)
        self.config = config
        self.tp = tp
        self.backend = backend
        self.dtype = dtype
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, device)
        self.embed_tokens = VocabParallelEmbedding(
            "model.embed_tokens", config.vocab_size, config.hidden_size, tp, dtype, device
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, tp, backend, dtype, device) for i in range(config.num_layers)
        )
        self.norm = RMSNorm("model.norm", config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead(
            "lm_head", self.embed_tokens, config.tie_word_embeddings, dtype, device
        )

    @property
    def num_local_kv_heads(self) -> int:
        start, end = self.config.kv_head_range(self.tp)
        return end - start

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [T], the step's new tokens, flat
        positions: torch.Tensor,  # int64 [T], position of each token in its sequence
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, local_kv_heads, head_dim]
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states ``[T, hidden_size]``; pick rows, then :meth:`compute_logits`."""
        expected = (len(self.layers), 2, self.num_local_kv_heads, self.config.head_dim)
        got = (kv_cache.shape[0], kv_cache.shape[1], kv_cache.shape[4], kv_cache.shape[5])
        assert got == expected, f"kv_cache dims {tuple(kv_cache.shape)} do not match {expected}"
        plan = self.backend.prepare(attn)
        cos, sin = self.rotary(positions, self.dtype)
        hidden = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer, kv_cache_layer in zip(self.layers, kv_cache):
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache_layer, plan)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[n, vocab_size]`` for ``hidden [n, hidden_size]``, full on every rank."""
        return self.lm_head(hidden)

    @torch.no_grad()
    def load_weights(self, reader: CheckpointReader) -> None:
        """Fill every parameter from ``reader`` (each module reads its own named tensors)."""
        for module in self.modules():
            if isinstance(module, CheckpointModule):
                module.load_from(reader)
