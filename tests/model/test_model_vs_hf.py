"""Our decoder's logits equal Hugging Face's on the same random checkpoints (float32, CPU).

Every case runs the same sequences through three kinds of steps: one flat prefill of prompts of
different lengths, a prefill split into two chunks (the second attends to the cached first), and
batched decode steps; plus a mixed step (decodes and prefill chunks together). Block ids are
handed out in shuffled order, so every block table is non-contiguous.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distserve.model.causal_lm import CausalLM
from distserve.model.loader import load_model
from distserve.model.tiny_model import make_tiny_model
from tests.model.model_test_utils import PagedSequences, hf_logits, random_sequences

ATOL = 1e-4
PROMPT_LENS = [7, 1, 13, 22]
NUM_DECODE = 3
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES: dict[str, tuple[str, dict[str, object]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2-bias": ("qwen2", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-mqa": ("llama", {"kv_heads": 1}),
    "qwen2-mha-tied": ("qwen2", {"kv_heads": 4, "tie_word_embeddings": True}),
    "llama-attention-bias": ("llama", {"attention_bias": True}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "linear-rope": ("mistral", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "dynamic-rope": ("qwen2", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
}
_cache: dict[str, tuple[CausalLM, list[list[int]], list[torch.Tensor]]] = {}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(our model, full sequences = prompt + decode tokens, HF logits of each full sequence)."""
    name = request.param
    if name not in _cache:
        torch.set_num_threads(1)
        arch, overrides = CASES[name]
        model_dir = make_tiny_model(tmp_path_factory.mktemp(name), arch=arch, seed=1, **overrides)
        model = load_model(model_dir, dtype=torch.float32)
        lengths = [n + NUM_DECODE for n in PROMPT_LENS]
        sequences = random_sequences(model.config.vocab_size, lengths, seed=2)
        _cache[name] = (model, sequences, hf_logits(Path(model_dir), sequences))
    return _cache[name]


def _new_cache(model: CausalLM) -> PagedSequences:
    config = model.config
    return PagedSequences(config.num_layers, model.num_local_kv_heads, config.head_dim)


def _run(
    model: CausalLM, paged: PagedSequences, new_tokens: dict[int, list[int]]
) -> list[torch.Tensor]:
    """Run one step; return each sequence's logits rows, in ``new_tokens`` order."""
    input_ids, positions, attn = paged.step(new_tokens)
    logits = model.compute_logits(model(input_ids, positions, paged.kv_cache, attn))
    assert logits.dtype == torch.float32 and logits.shape == (
        len(input_ids),
        model.config.vocab_size,
    )
    return list(logits.split(attn.query_lens_cpu))


def test_flat_prefill_matches_hf(case) -> None:
    model, sequences, expected = case
    paged = _new_cache(model)
    got = _run(model, paged, {i: seq[: PROMPT_LENS[i]] for i, seq in enumerate(sequences)})
    for i, rows in enumerate(got):
        torch.testing.assert_close(rows, expected[i][: PROMPT_LENS[i]], atol=ATOL, rtol=0)


def test_chunked_prefill_matches_hf(case) -> None:
    model, sequences, expected = case
    paged = _new_cache(model)
    cut = [max(1, n // 2) for n in PROMPT_LENS]
    first = _run(model, paged, {i: seq[: cut[i]] for i, seq in enumerate(sequences)})
    rest = {
        i: seq[cut[i] : PROMPT_LENS[i]]
        for i, seq in enumerate(sequences)
        if cut[i] < PROMPT_LENS[i]
    }
    second = dict(zip(rest, _run(model, paged, rest)))
    for i, rows in enumerate(first):
        torch.testing.assert_close(rows, expected[i][: cut[i]], atol=ATOL, rtol=0)
    for i, rows in second.items():
        torch.testing.assert_close(rows, expected[i][cut[i] : PROMPT_LENS[i]], atol=ATOL, rtol=0)


def test_batched_decode_matches_hf(case) -> None:
    model, sequences, expected = case
    paged = _new_cache(model)
    _run(model, paged, {i: seq[: PROMPT_LENS[i]] for i, seq in enumerate(sequences)})
    for step in range(NUM_DECODE):
        order = list(range(len(sequences)))[::-1] if step % 2 else list(range(len(sequences)))
        pos = {i: PROMPT_LENS[i] + step for i in order}
        got = _run(model, paged, {i: [sequences[i][pos[i]]] for i in order})
        for i, rows in zip(order, got):
            torch.testing.assert_close(rows[0], expected[i][pos[i]], atol=ATOL, rtol=0)


def test_mixed_prefill_and_decode_step_matches_hf(case) -> None:
    model, sequences, expected = case
    paged = _new_cache(model)
    s0, s1, s2, s3 = sequences
    n0, n1, n2, n3 = PROMPT_LENS
    steps = [
        {0: s0[:n0], 1: s1[:n1]},
        {0: [s0[n0]], 2: s2[:n2], 1: [s1[n1]], 3: s3[:5]},
        {3: s3[5:n3], 1: [s1[n1 + 1]], 0: [s0[n0 + 1]], 2: [s2[n2]]},
    ]
    seen = dict.fromkeys(range(4), 0)
    for step in steps:
        for i, rows in zip(step, _run(model, paged, step)):
            want = expected[i][seen[i] : seen[i] + len(step[i])]
            torch.testing.assert_close(rows, want, atol=ATOL, rtol=0)
            seen[i] += len(step[i])
