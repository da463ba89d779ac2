"""Rotary position embeddings (RoPE) and the scaling variants we support.

Owns: reading a checkpoint's RoPE settings into :class:`RopeConfig` (rejecting what we do not
implement), and turning positions into the cos/sin tables every layer applies to q and k.

Supported ``rope_type`` values:

* ``default`` — frequencies ``theta ** (-2i / head_dim)``.
* ``linear`` — every frequency divided by ``factor`` (positions interpolated).
* ``llama3`` — low frequencies divided by ``factor``, high ones kept, a smooth blend between.
* ``dynamic`` (dynamic NTK) — positions ``< max_position_embeddings`` use the default
  frequencies. A token at position ``p >= max_position_embeddings`` is rotated with the base that
  Hugging Face would use for a sequence of length ``p + 1``:
  ``theta * (factor * (p + 1) / max_pos - (factor - 1)) ** (d / (d - 2))``. Each token's key is
  rotated once, when it is written to the paged cache, so this equals Hugging Face decoding one
  token at a time; it differs from a Hugging Face prefill that crosses the original length (which
  re-rotates the whole prompt with one base).

The rotation is the "split halves" convention of Hugging Face Llama checkpoints: the head
dimension is cut into two halves ``(x1, x2)`` that rotate as the pair ``(x1 + i*x2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str  # one of SUPPORTED_ROPE_TYPES
    theta: float  # base wavelength
    factor: float = 1.0  # context extension factor (linear, dynamic, llama3)
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 0  # llama3: pretraining length; dynamic: max positions

    @classmethod
    def from_hf(cls, hf_config: Any) -> RopeConfig:
        """Read RoPE settings from a transformers config (v4 ``rope_scaling`` or v5 ``rope_parameters``)."""
        params = dict(
            getattr(hf_config, "rope_parameters", None)
            or getattr(hf_config, "rope_scaling", None)
            or {}
        )
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        partial = params.get(
            "partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)
        )
        if partial not in (None, 1.0):
            raise ValueError(
                f"unsupported partial_rotary_factor={partial}; only 1.0 is implemented"
            )
        theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0))
        max_positions = int(hf_config.max_position_embeddings)
        factor = float(params.get("factor", 1.0))
        if rope_type != "default" and factor < 1.0:
            raise ValueError(f"rope scaling factor must be >= 1, got {factor}")
        if rope_type == "llama3":
            return cls(
                rope_type=rope_type,
                theta=theta,
                factor=factor,
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(
                    params.get("original_max_position_embeddings", max_positions)
                ),
            )
        return cls(rope_type, theta, factor, original_max_position_embeddings=max_positions)


def _default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def _llama3_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(rope.theta, head_dim)
    old_len = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    long_wavelen = old_len / rope.low_freq_factor  # longer than this: fully interpolated
    short_wavelen = old_len / rope.high_freq_factor  # shorter than this: untouched
    scaled = torch.where(wavelen > long_wavelen, inv_freq / rope.factor, inv_freq)
    blend = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - blend) * scaled / rope.factor + blend * scaled
    is_medium = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Computes per-token cos/sin once per forward; layers apply them with :func:`apply_rotary`."""

    def __init__(self, rope: RopeConfig, head_dim: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.rope = rope
        self.head_dim = head_dim
        if rope.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(rope, head_dim)
        elif rope.rope_type == "linear":
            inv_freq = _default_inv_freq(rope.theta, head_dim) / rope.factor
        else:
            inv_freq = _default_inv_freq(rope.theta, head_dim)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables of shape ``[T, head_dim // 2]`` in ``dtype`` for ``positions [T]``."""
        pos = positions.to(torch.float32)[:, None]
        if self.rope.rope_type == "dynamic":
            angles = pos * self._dynamic_inv_freq(positions)
        else:
            angles = pos * self.inv_freq[None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _dynamic_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        """Per-token frequencies ``[T, head_dim // 2]``; see the module docstring."""
        dim, factor = self.head_dim, self.rope.factor
        max_len = self.rope.original_max_position_embeddings
        seq_len = (positions + 1).clamp(min=max_len).to(torch.float32)[:, None]
        base = self.rope.theta * (factor * seq_len / max_len - (factor - 1)) ** (dim / (dim - 2))
        exponents = (
            torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
        )
        scaled = 1.0 / (base ** exponents[None, :])
        is_beyond = (positions + 1 > max_len)[:, None]
        return torch.where(is_beyond, scaled, self.inv_freq[None, :])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` by the per-token angles in ``cos``/``sin [T, head_dim // 2]``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
