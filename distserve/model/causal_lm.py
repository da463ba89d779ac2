"""The causal language model the engine runs: embedding → decoder layers → final norm → LM head.

Owns the forward signature the model runner calls and the walk that fills every weight from a
checkpoint. Inputs arrive only as arguments (token ids, positions, the paged KV cache and the
step's attention metadata); there is no global forward context.

Under pipeline parallelism one ``CausalLM`` is one stage: the decoder layers of
:func:`~distserve.model.parallel.stage_layer_range`, plus the embedding on the first stage and the
final norm and LM head on the last (a last stage with tied embeddings also holds the embedding
matrix, as the head's weight). A stage other than the first takes the previous stage's output
``hidden_states`` instead of token ids; a stage other than the last returns its layers' output
(the residual stream, ``mlp_out + residual``), which is exactly what the next layer's fused
residual add would have computed, so splitting changes no arithmetic.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from distserve.model.attention import AttentionBackend
from distserve.model.attention_metadata import AttentionMetadata
from distserve.model.config import ModelConfig
from distserve.model.decoder_layer import DecoderLayer
from distserve.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distserve.model.layers.norm import RMSNorm
from distserve.model.layers.rotary import RotaryEmbedding
from distserve.model.parallel import PipelineParallelGroup, TensorParallelGroup
from distserve.model.weights import CheckpointModule, CheckpointReader

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


class CausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        tp: TensorParallelGroup,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device | str,
        pp: PipelineParallelGroup = PipelineParallelGroup(),  # noqa: B008 (frozen, a safe default)
    ) -> None:
        super().__init__()
        config.check_tensor_parallel(tp)
        self.config = config
        self.tp = tp
        self.pp = pp
        self.backend = backend
        self.dtype = dtype
        self.layer_start, self.layer_end = pp.layer_range(config.num_layers)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, device)
        needs_embedding = pp.is_first or (pp.is_last and config.tie_word_embeddings)
        self.embed_tokens = (
            VocabParallelEmbedding(
                "model.embed_tokens", config.vocab_size, config.hidden_size, tp, dtype, device
            )
            if needs_embedding
            else None
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, tp, backend, dtype, device)
            for i in range(self.layer_start, self.layer_end)
        )
        self.norm = self.lm_head = None
        if pp.is_last:
            self.norm = RMSNorm(
                "model.norm", config.hidden_size, config.rms_norm_eps, dtype, device
            )
            self.lm_head = ParallelLMHead(
                "lm_head",
                config.vocab_size,
                config.hidden_size,
                tp,
                dtype,
                device,
                tied_to=self.embed_tokens if config.tie_word_embeddings else None,
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
        kv_cache: torch.Tensor,  # [stage layers, 2, num_blocks, block_size, local_kv_heads, head_dim]
        attn: AttentionMetadata,
        hidden_states: torch.Tensor | None = None,  # [T, hidden_size] from the previous stage
    ) -> torch.Tensor:
        """``[T, hidden_size]``: final-normed hidden states on the last stage (pick rows, then
        :meth:`compute_logits`), the residual stream to send on for any other stage."""
        expected = (len(self.layers), 2, self.num_local_kv_heads, self.config.head_dim)
        got = (kv_cache.shape[0], kv_cache.shape[1], kv_cache.shape[4], kv_cache.shape[5])
        assert got == expected, f"kv_cache dims {tuple(kv_cache.shape)} do not match {expected}"
        plan = self.backend.prepare(attn)
        cos, sin = self.rotary(positions, self.dtype)
        if self.pp.is_first:
            hidden = self.embed_tokens(input_ids)
        else:
            assert hidden_states is not None, "a later pipeline stage needs hidden_states"
            hidden = hidden_states
        residual: torch.Tensor | None = None
        for layer, kv_cache_layer in zip(self.layers, kv_cache):
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache_layer, plan)
        if self.norm is None:
            return hidden if residual is None else hidden + residual
        hidden, _ = self.norm(hidden, residual)
        return hidden

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[n, vocab_size]`` for ``hidden [n, hidden_size]``, full on every rank
        of the last stage."""
        assert self.lm_head is not None, "only the last pipeline stage computes logits"
        return self.lm_head(hidden)

    def holds_tensor(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` belongs to this stage (always, without PP); names
        this stage does not hold are left unread, names no stage knows are still unexpected."""
        match = _LAYER_NAME.match(name)
        if match:
            return self.layer_start <= int(match[1]) < self.layer_end
        if name.startswith("model.embed_tokens."):
            return self.embed_tokens is not None
        if name.startswith(("model.norm.", "lm_head.")):
            return self.pp.is_last
        return True

    @torch.no_grad()
    def load_weights(self, reader: CheckpointReader) -> None:
        """Fill every parameter from ``reader`` (each module reads its own named tensors)."""
        for module in self.modules():
            if isinstance(module, CheckpointModule):
                module.load_from(reader)
