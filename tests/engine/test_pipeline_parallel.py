"""Pipeline parallelism: stages split the layers, hold only their weights and KV, and the engine's
output equals Hugging Face transformers (greedy tokens, logprobs) for PP=2 and PP=2 x TP=2."""

from __future__ import annotations

import random

import pytest
import torch

from distserve import LLM, SamplingParams
from distserve.engine.worker import Worker, WorkerSpec
from distserve.model.loader import load_model
from distserve.model.parallel import PipelineParallelGroup, stage_layer_range
from tests.model.model_test_utils import PagedSequences

NEW_TOKENS = 10
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(n)] for n in lengths]


def _assert_matches_hf(outputs, prompts, ref, atol=2e-4):
    for prompt, out in zip(prompts, outputs):
        tokens, rows = ref.greedy(prompt, NEW_TOKENS)
        assert out.token_ids == tokens, f"prompt of {len(prompt)} tokens diverged"
        for step, (lp, row) in enumerate(zip(out.logprobs, rows)):
            assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=atol), f"step {step}"
            for token_id, value in lp.top.items():
                assert value == pytest.approx(float(row[token_id]), abs=atol), f"step {step}"


def test_stage_layer_range_is_even_with_the_remainder_first():
    assert [stage_layer_range(10, 4, s) for s in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [stage_layer_range(3, 2, s) for s in range(2)] == [(0, 2), (2, 3)]
    assert [stage_layer_range(4, 4, s) for s in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="exceeds the model's 2 decoder layers"):
        stage_layer_range(2, 3, 0)
    with pytest.raises(ValueError, match="must be >= 1"):
        stage_layer_range(2, 0, 0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_stages_chained_in_process_equal_the_whole_model(tiny_models, tied):
    """No processes: stage 0's output fed to stage 1 gives the unsplit model's logits."""
    path = tiny_models("llama", layers=3, tie_word_embeddings=tied)
    whole = load_model(path, dtype=torch.float32)
    stages = [
        load_model(path, dtype=torch.float32, pp=PipelineParallelGroup(rank=s, size=2))
        for s in range(2)
    ]
    assert [len(s.layers) for s in stages] == [2, 1]
    assert stages[0].norm is None and stages[0].lm_head is None
    assert (stages[1].embed_tokens is not None) == tied  # the tied head's weight
    cfg = whole.config
    paged_whole = PagedSequences(3, whole.num_local_kv_heads, cfg.head_dim, seed=1)
    paged = PagedSequences(3, whole.num_local_kv_heads, cfg.head_dim, seed=1)
    s0, s1 = _prompts(cfg.vocab_size, [9, 13], seed=2)
    for step in ({0: s0, 1: s1[:6]}, {1: s1[6:], 0: [17]}, {0: [18], 1: [19]}):
        ids, pos, attn = paged_whole.step(step)
        expected = whole.compute_logits(whole(ids, pos, paged_whole.kv_cache, attn))
        ids, pos, attn = paged.step(step)
        hidden = stages[0](ids, pos, paged.kv_cache[0:2], attn)
        out = stages[1](ids, pos, paged.kv_cache[2:3], attn, hidden_states=hidden)
        torch.testing.assert_close(stages[1].compute_logits(out), expected, atol=1e-5, rtol=0)


def test_worker_of_a_later_stage_holds_only_its_layers(tiny_models):
    path = tiny_models("llama", layers=3)
    spec = WorkerSpec(str(path), "float32", "cpu", num_blocks=8, block_size=4)
    worker = Worker(spec, pp=PipelineParallelGroup(rank=1, size=2, prev_peer=0))
    assert worker.layer_range == (2, 3)
    assert worker.kv_cache.shape[0] == 1
    names = {n for n, _ in worker.model.named_parameters()}
    assert not any(n.startswith("embed_tokens") for n in names)
    assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {"0"}  # one local layer
    assert "lm_head.weight" in names and "norm.weight" in names


def test_pp2_uneven_layers_tied_chunked_prefill_and_prefix_cache_equal_hf(
    tiny_models, hf_reference
):
    """3 layers over 2 stages (2 + 1), tied embeddings (the last stage holds the head's copy),
    prompts longer than the 32-token budget (chunked prefill), a lone long prompt (steps that
    sample nothing, so no logits travel), then a shared-prefix request."""
    path = tiny_models("llama", layers=3, tie_word_embeddings=True)
    ref = hf_reference(path)
    vocab = ref.model.config.vocab_size
    prompts = _prompts(vocab, [3, 45, 70], seed=5)
    llm = LLM(
        str(path),
        pipeline_parallel_size=2,
        block_size=8,
        num_kv_blocks=128,
        max_num_batched_tokens=32,
        num_threads=1,
    )
    try:
        assert llm.engine.pp_size == 2 and llm.engine.world_size == 2
        outputs = llm.generate(prompts, GREEDY)
        _assert_matches_hf(outputs, prompts, ref)
        lone = _prompts(vocab, [75], seed=7)
        _assert_matches_hf(llm.generate(lone, GREEDY), lone, ref)
        again = prompts[2][:64] + [11, 12, 13]  # 8 full blocks of 8 shared with prompts[2]
        cached = llm.generate([again], GREEDY)[0]
    finally:
        llm.shutdown()
    assert cached.num_cached_tokens == 64
    _assert_matches_hf([cached], [again], ref)


def test_pp2_tp2_equals_hf(tiny_models, hf_reference):
    """4 ranks: (stage, TP rank) = (0,0) driver, (0,1), (1,0), (1,1); 2 layers, 2 KV heads."""
    path = tiny_models("llama")
    ref = hf_reference(path)
    prompts = _prompts(ref.model.config.vocab_size, [5, 40], seed=6)
    llm = LLM(
        str(path),
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        block_size=8,
        num_kv_blocks=64,
        max_num_batched_tokens=32,
        num_threads=1,
    )
    try:
        outputs = llm.generate(prompts, GREEDY)
    finally:
        llm.shutdown()
    _assert_matches_hf(outputs, prompts, ref)


@pytest.mark.parametrize(
    ("pp", "match"),
    [(3, "exceeds the model's 2 decoder layers"), (0, "must be >= 1"), (-1, "must be >= 1")],
)
def test_invalid_pipeline_sizes_are_value_errors_before_any_rank_starts(tiny_llama, pp, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_llama), pipeline_parallel_size=pp, num_kv_blocks=16)


def test_a_stage_that_fails_to_load_fails_the_llm_and_leaves_no_rank(tiny_models, tmp_path):
    """Only stage 1 reads layer 2, so the driver builds fine and must learn of the failure."""
    import multiprocessing
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models("llama", layers=3), broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError):
        LLM(str(broken), pipeline_parallel_size=2, num_kv_blocks=16, num_threads=1)
    assert not multiprocessing.active_children()
