"""A small byte-level BPE tokenizer for the random test/demo checkpoints.

Owns: the embedded training text, the deterministic BPE training (Hugging Face ``tokenizers``),
the special tokens and the ChatML-like chat template. Token ids::

    0..4     <|bos|> <|eos|> <|pad|> <|im_start|> <|im_end|>   (special, never split)
    5..260   the 256 byte symbols of the ByteLevel alphabet         (any text can be encoded)
    261..    merges learned from TRAINING_TEXT                       (at most NUM_MERGES)

Because the training text mixes ASCII with accented Latin, Cyrillic, CJK and emoji, multi-byte
UTF-8 characters are merged into one token when frequent and split over byte tokens when rare.

Two pre-tokenizer styles: ``"byte_level"`` (GPT-2's ByteLevel split, no normalisation: decoding
the ids of any string gives the string back exactly) for llama/mistral, and ``"qwen2"`` for qwen2
checkpoints. transformers >= 5 ignores a qwen2 checkpoint's pipeline and rebuilds it as
``Qwen2Tokenizer`` (NFC normalisation, Qwen's split regex), so we write exactly that pipeline to
keep ``tokenizer.json`` and ``AutoTokenizer`` in agreement; text then round-trips up to NFC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

BOS, EOS, PAD, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)
NUM_MERGES = 400  # upper bound; TRAINING_TEXT yields fewer pairs seen at least twice
TokenizerStyle = Literal["byte_level", "qwen2"]
# Qwen2's split: contractions, letters runs (with one leading non-letter), single digits,
# punctuation runs, newlines, other whitespace
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A serving engine splits the prefill of a prompt
from the decoding of its answer, so that each phase runs on the machines that suit it best.
The prefill phase reads the whole prompt at once and is limited by compute; the decode phase
produces one token at a time for many requests together and is limited by memory bandwidth.
Keys and values of every token are kept in a paged cache of fixed-size blocks, and the blocks
of a finished prefill are sent to a decode instance before the first token is returned.
def generate(prompt: str, max_tokens: int = 16) -> str:
    tokens = tokenizer.encode(prompt)
    for step in range(max_tokens):
        logits = model(tokens)
        tokens.append(int(logits.argmax()))
    return tokenizer.decode(tokens)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14159 2.71828 1e-5 -7 +12 50% $19.99
Hello, world! How are you today? I am fine, thank you. What is the time? It is 10:30.
Grüße aus München! Die Straße ist schön, und das Wetter ist heute überraschend gut.
Le café est très chaud ; où est la bibliothèque ? C'était une journée agréable à Paris.
El niño comió una manzana. ¿Dónde está la estación? ¡Qué día tan bonito en España!
Привет, мир! Как дела? Москва — столица России. Спасибо большое, до свидания.
Γειά σου κόσμε. Η Αθήνα είναι μια όμορφη πόλη.
你好，世界！今天天气很好。我们一起去学习中文吧。你好，朋友。世界很大，我们很小。
こんにちは、世界！今日はいい天気ですね。日本語を勉強しています。ありがとうございます。
안녕하세요, 세계! 오늘 날씨가 좋네요. 감사합니다.
Emoji: 🙂 😀 🚀 ✨ 🎉 👍 ❤️ 🙂🙂 🚀🚀 — they take four bytes each in UTF-8 🙂.
Symbols: → ← ↑ ↓ ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ © ® ™ € £ ¥ § ¶ • … « » “quotes” ‘single’
"""


def build_tokenizer(style: TokenizerStyle = "byte_level") -> Tokenizer:
    """Train the tokenizer; the same text and settings always give the same merges."""
    tokenizer = Tokenizer(models.BPE())
    if style == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(alphabet) + NUM_MERGES,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict[str, object]:
    """Contents of ``tokenizer_config.json`` for :func:`build_tokenizer`'s tokenizer."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    import json

    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
