"""RMSNorm, optionally fused with the residual add that precedes it.

Statistics are computed in float32 and the result is cast back to the input dtype before the
weight is applied, which is what Llama/Mistral/Qwen2 checkpoints were trained with. The weight is
replicated on every tensor-parallel rank.
"""

from __future__ import annotations

import torch

from distserve.model.weights import CheckpointModule, CheckpointReader, TensorSlice, empty_param


class RMSNorm(CheckpointModule):
    def __init__(
        self,
        prefix: str,
        hidden_size: int,
        eps: float,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.prefix = prefix  # checkpoint name without ".weight"
        self.eps = eps
        self.weight = empty_param(hidden_size, dtype=dtype, device=device)

    def load_from(self, reader: CheckpointReader) -> None:
        name = f"{self.prefix}.weight"
        self.weight.copy_(reader.read(TensorSlice(name, tuple(self.weight.shape))))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(norm(x + residual), x + residual)``; the second is the new residual stream."""
        if residual is not None:
            x = x + residual
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype), x
