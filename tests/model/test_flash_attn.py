"""flash_attn backend equals the SDPA backend on a paged step (needs CUDA and flash-attn).

Run on a GPU machine with ``pytest -m gpu tests/model``; skipped elsewhere.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from distserve.model.attention import get_backend
from tests.model.model_test_utils import PagedSequences

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
        reason="needs CUDA and the flash_attn package",
    ),
]


def _attend(backend_name: str, steps: list[dict[int, list[int]]]) -> list[torch.Tensor]:
    torch.manual_seed(0)
    heads, kv_heads, head_dim, block_size = 8, 2, 64, 256
    paged = PagedSequences(1, kv_heads, head_dim, num_blocks=16, block_size=block_size)
    paged.kv_cache = paged.kv_cache.to("cuda", torch.bfloat16)
    backend = get_backend(backend_name, "cuda")
    outs = []
    for step in steps:
        _, _, attn = paged.step(step)
        for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
            setattr(attn, name, getattr(attn, name).cuda())
        num_tokens = attn.slot_mapping.shape[0]
        q = torch.randn(num_tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(num_tokens, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        plan = backend.prepare(attn)
        outs.append(backend.forward(q, k, v, paged.kv_cache[0], plan, head_dim**-0.5))
    return outs


def test_flash_attn_matches_sdpa() -> None:
    steps = [
        {0: list(range(300)), 1: list(range(40))},  # prefill; seq 0 spans two blocks
        {0: [1], 1: list(range(50)), 2: list(range(7))},  # decode + chunk over cache + new
        {0: [2], 1: [3], 2: [4]},  # pure decode
    ]
    for got, want in zip(_attend("flash_attn", steps), _attend("sdpa", steps)):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)
