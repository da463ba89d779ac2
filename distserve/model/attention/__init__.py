"""Attention backends behind one interface, chosen by name.

``get_backend("auto", device)`` picks ``flash_attn`` on CUDA when the ``flash_attn`` package is
importable, and ``sdpa`` (PyTorch ``scaled_dot_product_attention``, any device) otherwise. New
backends subclass :class:`AttentionBackend` and are added to ``_BACKENDS``.
"""

from __future__ import annotations

import torch

from distserve.model.attention.base import AttentionBackend, write_kv
from distserve.model.attention.flash_attn import FlashAttnBackend
from distserve.model.attention.sdpa import SdpaBackend

__all__ = ["AttentionBackend", "SdpaBackend", "available_backends", "get_backend", "write_kv"]

# in "auto" preference order
_BACKENDS: dict[str, type[AttentionBackend]] = {
    FlashAttnBackend.name: FlashAttnBackend,
    SdpaBackend.name: SdpaBackend,
}


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [name for name, cls in _BACKENDS.items() if cls.is_available(device)]


def get_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """An instance of backend ``name`` (or the best available one for ``"auto"``) for ``device``."""
    device = torch.device(device)
    if name == "auto":
        return _BACKENDS[available_backends(device)[0]]()
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose from auto, {', '.join(_BACKENDS)}"
        )
    if not _BACKENDS[name].is_available(device):
        raise ValueError(f"attention backend {name!r} is not available on {device}")
    return _BACKENDS[name]()
