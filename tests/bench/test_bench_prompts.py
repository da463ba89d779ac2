"""Bench prompts: requested token lengths, shared prefixes, no special tokens, text round trip."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from distserve.bench.prompts import PromptOptions, build_prompts
from distserve.model.tiny_tokenizer import build_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(build_tokenizer(), folder, 512)
    return AutoTokenizer.from_pretrained(folder)


def test_random_prompts_have_the_requested_lengths():
    got = build_prompts(
        "random", PromptOptions(num_prompts=5, input_len=40, output_len=7), 500, None
    )
    assert [len(p.prompt) for p in got] == [40] * 5
    assert [p.input_len for p in got] == [40] * 5 and [p.output_len for p in got] == [7] * 5
    assert all(0 <= t < 500 for p in got for t in p.prompt)
    assert len({tuple(p.prompt) for p in got}) == 5
    again = build_prompts(
        "random", PromptOptions(num_prompts=5, input_len=40, output_len=7), 500, None
    )
    assert [p.prompt for p in again] == [p.prompt for p in got]  # seeded


def test_shared_prefix_prompts_share_their_group_prefix():
    opts = PromptOptions(
        num_prompts=12, input_len=100, output_len=4, prefix_len=64, num_prefix_groups=2
    )
    got = build_prompts("shared-prefix", opts, 1000, None)
    assert all(len(p.prompt) == 100 for p in got)
    prefixes = {tuple(p.prompt[:64]) for p in got}
    assert len(prefixes) == 2  # two groups, each prefix shared by its members
    assert len({tuple(p.prompt[64:]) for p in got}) == 12  # suffixes all differ


def test_special_tokens_are_kept_out_and_text_round_trips(tokenizer):
    opts = PromptOptions(num_prompts=4, input_len=30, output_len=4, as_text=True)
    got = build_prompts("random", opts, len(tokenizer), tokenizer)
    for p in got:
        assert isinstance(p.prompt, str)
        ids = tokenizer.encode(p.prompt, add_special_tokens=False)
        assert abs(len(ids) - 30) <= 1 and p.input_len == len(ids)
        assert not set(ids) & set(tokenizer.all_special_ids)
    as_ids = build_prompts(
        "random", PromptOptions(num_prompts=4, input_len=30), len(tokenizer), tokenizer
    )
    assert not {t for p in as_ids for t in p.prompt} & set(tokenizer.all_special_ids)


def test_sharegpt_prompts_are_the_first_turns(tmp_path):
    data = [
        {
            "conversations": [
                {"from": "human", "value": "What is KV?"},
                {"from": "gpt", "value": "A cache " * 8},
            ]
        },
        {"conversations": [{"from": "human", "value": "lonely"}]},  # skipped: no reply
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    got = build_prompts(f"sharegpt:{path}", PromptOptions(num_prompts=10), None, None)
    assert [p.prompt for p in got] == ["What is KV?", "Hi"]
    assert got[0].output_len == len("A cache " * 8) // 4  # workloads' chars/4 estimate
    fixed = build_prompts(
        f"sharegpt:{path}", PromptOptions(num_prompts=10, output_len=3), None, None
    )
    assert [p.output_len for p in fixed] == [3, 3]


@pytest.mark.parametrize(
    ("dataset", "vocab", "needle"),
    [
        ("random", None, "--vocab-size"),
        ("sharegpt", None, "sharegpt:PATH"),
        ("nonsense", 100, "unknown dataset"),
    ],
)
def test_clear_errors(dataset, vocab, needle):
    with pytest.raises(ValueError, match=needle):
        build_prompts(dataset, PromptOptions(num_prompts=1), vocab, None)
    with pytest.raises(ValueError, match="--tokenizer"):
        build_prompts("random", PromptOptions(num_prompts=1, as_text=True), 100, None)
