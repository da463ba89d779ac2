"""make_tiny_model writes checkpoints that transformers loads, with a byte-level tokenizer."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distserve.model.config import ModelConfig
from distserve.model.loader import load_model
from distserve.model.tiny_model import PRESETS, TINY_OVERRIDE_KEYS, make_tiny_model
from tests.model.model_test_utils import PagedSequences

TEXTS = [
    "Hello, world! 🙂🚀 emoji",
    "你好，世界！今天天气很好。龘",
    "日本語とカタカナ, 한국어, Ελληνικά, Привет",
    "cafe\u0301 vs café, ﬁ ligature, zero\u200bwidth, tabs\t\tand  double  spaces \n\n end ",
    "<|im_start|>literal special tokens<|im_end|> stay as written",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch=arch) for arch in ("llama", "mistral", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_transformers_loads_checkpoint_and_tokenizer(
    checkpoints: dict[str, Path], arch: str
) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = checkpoints[arch]
    config = json.loads((model_dir / "config.json").read_text())
    expected = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }
    assert config["architectures"] == [expected[arch]] and config["model_type"] == arch
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert raw.encode(text, add_special_tokens=False).ids == ids
        # qwen2 tokenizers normalise to NFC (transformers rebuilds them that way)
        assert tokenizer.decode(ids) == (
            unicodedata.normalize("NFC", text) if arch == "qwen2" else text
        )
    prompt = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
    assert len(set(out.tolist())) > 3, f"greedy decoding collapsed: {out.tolist()}"


def test_tokenizer_is_byte_level_bpe_with_specials(checkpoints: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints["llama"])
    for token in ("<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert tokenizer.convert_tokens_to_ids(token) < 5
        assert tokenizer("a" + token, add_special_tokens=False).input_ids[-1] < 5
    assert tokenizer.bos_token == "<|bos|>" and tokenizer.eos_token == "<|eos|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert 256 + 5 + 100 < len(tokenizer) <= 256 + 5 + 400
    # a frequent CJK word is merged into one token; a rare character is split over byte tokens
    assert len(tokenizer("你好", add_special_tokens=False).input_ids) == 1
    rare = tokenizer("龘", add_special_tokens=False).input_ids
    assert len(rare) == 3 and all(tokenizer.decode([i]) != "龘" for i in rare)
    generation = json.loads((checkpoints["llama"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(["<|eos|>", "<|im_end|>"])


def test_chat_template_renders_chatml(checkpoints: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints["qwen2"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _model_logits(model_dir: Path, dtype: torch.dtype, token_ids: list[int]) -> torch.Tensor:
    model = load_model(model_dir, dtype=dtype)
    paged = PagedSequences(2, model.num_local_kv_heads, model.config.head_dim, dtype=dtype)
    input_ids, positions, attn = paged.step({0: token_ids})
    return model.compute_logits(model(input_ids, positions, paged.kv_cache, attn))


def test_sharded_and_bf16_checkpoints_load(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    plain = make_tiny_model(tmp_path / "plain", arch="qwen2", seed=3)
    sharded = make_tiny_model(tmp_path / "sharded", arch="qwen2", seed=3, shard_size=40_000)
    bf16 = make_tiny_model(tmp_path / "bf16", arch="qwen2", seed=3, dtype="bfloat16")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (sharded / "model.safetensors").exists()
    tokens = [5, 77, 301, 42, 9, 260, 11]
    reference = _model_logits(plain, torch.float32, tokens)
    torch.testing.assert_close(
        _model_logits(sharded, torch.float32, tokens), reference, atol=0, rtol=0
    )
    assert ModelConfig.from_pretrained(bf16).torch_dtype == torch.bfloat16
    with safe_open(str(bf16 / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    hf_bf16 = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32)
    with torch.no_grad():
        expected = hf_bf16(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(
        _model_logits(bf16, torch.float32, tokens), expected, atol=1e-4, rtol=0
    )
    for dtype in (torch.bfloat16, torch.float16):  # half-precision compute: close, not equal
        logits = _model_logits(bf16, dtype, tokens)
        assert logits.dtype == torch.float32
        assert (logits - expected).abs().mean() < 0.05


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", seed=7)
    b = make_tiny_model(tmp_path / "b", seed=7)
    c = make_tiny_model(tmp_path / "c", seed=8)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"num_layers": 3}, "num_layers"),
        ({"layers": 0}, "layers"),
        ({"heads": 3}, "hidden_size"),
        ({"kv_heads": 3}, "kv_heads"),
        ({"dtype": "int8"}, "dtype"),
        ({"shard_size": -5}, "shard_size"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"rope_scaling": "linear"}, "rope_scaling"),
    ],
)
def test_invalid_overrides_name_the_key(
    tmp_path: Path, overrides: dict[str, object], key: str
) -> None:
    with pytest.raises(ValueError, match=key):
        make_tiny_model(tmp_path, **overrides)


def test_attention_bias_only_for_llama(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="attention_bias"):
        make_tiny_model(tmp_path, arch="mistral", attention_bias=True)


def test_presets_and_override_keys() -> None:
    assert set(PRESETS["tiny"]) <= TINY_OVERRIDE_KEYS
    s = PRESETS["small-100m"]
    head_dim = s["hidden_size"] // s["heads"]
    attn = s["hidden_size"] * head_dim * (2 * s["heads"] + 2 * s["kv_heads"])
    mlp = 3 * s["hidden_size"] * s["intermediate_size"]
    num_params = s["layers"] * (attn + mlp) + 2 * 500 * s["hidden_size"]
    assert 50e6 <= num_params <= 100e6
