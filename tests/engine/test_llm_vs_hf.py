"""The engine equals Hugging Face transformers token for token (greedy, float32)."""

from __future__ import annotations

import random

import pytest
import torch

from distserve import LLM, SamplingParams

NEW_TOKENS = 32


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(n)] for n in lengths]


def _assert_matches_hf(outputs, prompts, ref, atol=2e-4):
    for prompt, out in zip(prompts, outputs):
        tokens, logprob_rows = ref.greedy(prompt, NEW_TOKENS)
        assert out.token_ids == tokens, f"prompt of {len(prompt)} tokens diverged"
        assert len(out.logprobs) == NEW_TOKENS
        for step, (lp, row) in enumerate(zip(out.logprobs, logprob_rows)):
            assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=atol), f"step {step}"
            for token_id, value in lp.top.items():
                assert value == pytest.approx(float(row[token_id]), abs=atol), (
                    f"step {step} token {token_id}"
                )


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {}),
        ("mistral", {}),
        ("qwen2", {}),
        ("llama", {"kv_heads": 1, "tie_word_embeddings": True}),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 128,
                }
            },
        ),
    ],
    ids=["llama", "mistral", "qwen2", "llama-mqa-tied", "llama-rope-llama3"],
)
def test_greedy_batch_equals_hf(tiny_models, hf_reference, arch, overrides):
    path = tiny_models(arch, **overrides)
    ref = hf_reference(path)
    lengths = [
        1,
        7,
        16,
        33,
        120,
        300,
    ]  # 300 > the 128-token budget (chunked) and spans 75 blocks of 4
    prompts = _prompts(ref.model.config.vocab_size, lengths)
    llm = LLM(
        str(path), block_size=4, num_kv_blocks=1024, max_num_batched_tokens=128, max_num_seqs=8
    )
    outputs = llm.generate(prompts, GREEDY)
    _assert_matches_hf(outputs, prompts, ref)


def test_prefix_cache_reuses_blocks_and_keeps_outputs(tiny_llama, hf_reference):
    ref = hf_reference(tiny_llama)
    llm = LLM(str(tiny_llama), block_size=8, num_kv_blocks=256)
    shared = _prompts(ref.model.config.vocab_size, [200], seed=1)[0]
    first = shared + [11, 12, 13]
    second = shared + [21, 22]
    out1 = llm.generate([first], GREEDY)[0]
    assert out1.num_cached_tokens == 0
    stats = llm.engine.kv.pool.stats
    queried, hits = stats.num_queried_tokens, stats.num_hit_tokens
    out2 = llm.generate([second], GREEDY)[0]
    # 200 shared tokens = 25 full blocks of 8; the second request computes only its new tokens.
    assert out2.num_cached_tokens == 200
    assert stats.num_hit_tokens - hits == 200 and stats.num_queried_tokens - queried == len(second)
    _assert_matches_hf([out1, out2], [first, second], ref)


def test_eviction_under_small_pool_keeps_outputs(tiny_llama, hf_reference):
    ref = hf_reference(tiny_llama)
    # 40 blocks of 4 = 160 tokens: each request fits alone, their caches cannot all stay.
    llm = LLM(str(tiny_llama), block_size=4, num_kv_blocks=40, max_num_seqs=1)
    prompts = _prompts(ref.model.config.vocab_size, [90, 90, 90], seed=2)
    prompts.append(prompts[0][:60] + [5, 6, 7])  # shares a prefix that was likely evicted
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.kv.pool.stats.num_evicted_blocks > 0
    _assert_matches_hf(outputs, prompts, ref)
    llm.engine.kv.check_consistency()
    assert llm.engine.kv.num_free_blocks == 40


def test_preemption_under_tiny_kv_budget_keeps_outputs(tiny_llama, hf_reference):
    ref = hf_reference(tiny_llama)
    # 8 requests of ~40 tokens growing to ~72 need ~18 blocks each; the pool holds 48.
    llm = LLM(
        str(tiny_llama), block_size=4, num_kv_blocks=48, max_num_seqs=8, enable_prefix_caching=False
    )
    prompts = _prompts(ref.model.config.vocab_size, [40, 35, 41, 38, 30, 44, 39, 36], seed=3)
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions_total > 0
    _assert_matches_hf(outputs, prompts, ref)
    assert llm.engine.kv.num_free_blocks == 48


def test_eos_stops_like_hf_generate(tiny_llama):
    """Against ``generate`` itself: EOS and max_tokens end requests where HF ends them."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    llm = LLM(str(tiny_llama))
    prompts = _prompts(hf.config.vocab_size, [5, 50, 17], seed=4)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(prompts, outputs):
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[
            0, len(prompt) :
        ].tolist()
        assert out.token_ids == ids
        assert out.finish_reason == ("stop" if ids[-1] in llm.engine.eos_token_ids else "length")


def test_seeded_sampling_reproducible_and_top_k_1_is_greedy(tiny_llama):
    llm = LLM(str(tiny_llama))
    prompt = [[40, 41, 42, 43]]
    sampled = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    a = llm.generate(prompt * 3, sampled)
    b = llm.generate(prompt, sampled)
    assert a[0].token_ids == a[1].token_ids == a[2].token_ids == b[0].token_ids
    other = llm.generate(
        prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=124, ignore_eos=True)
    )
    assert other[0].token_ids != a[0].token_ids
    greedy = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    top1 = llm.generate(
        prompt, SamplingParams(max_tokens=16, temperature=0.8, top_k=1, ignore_eos=True)
    )
    assert greedy[0].token_ids == top1[0].token_ids


def test_text_prompts_stop_strings_and_detokenization(tiny_llama):
    llm = LLM(str(tiny_llama))
    tok = llm.tokenizer
    out = llm.generate(
        "héllo wörld 日本", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    )[0]
    assert out.prompt_token_ids == tok.encode("héllo wörld 日本", add_special_tokens=False)
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    # Stop at a string taken from the greedy text itself: the text ends right before it.
    stop = out.text[10:13]
    cut = llm.generate(
        "héllo wörld 日本",
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]),
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == out.text[: out.text.find(stop)]


def test_bad_prompts_raise_value_error_naming_the_problem(tiny_llama):
    llm = LLM(str(tiny_llama), max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[10**9]])
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 64])
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([3.5])
    # Nothing was admitted by the failed calls.
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("overrides", [{}, {"kv_heads": 1}], ids=["gqa", "mqa-replicated"])
def test_tensor_parallel_2_equals_hf(tiny_models, hf_reference, overrides):
    path = tiny_models("llama", **overrides)
    ref = hf_reference(path)
    prompts = _prompts(ref.model.config.vocab_size, [3, 40, 150], seed=5)
    llm = LLM(
        str(path),
        tensor_parallel_size=2,
        block_size=8,
        num_kv_blocks=256,
        max_num_batched_tokens=64,
    )
    try:
        outputs = llm.generate(prompts, GREEDY)
    finally:
        llm.shutdown()
    _assert_matches_hf(outputs, prompts, ref)
