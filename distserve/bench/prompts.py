"""Concrete prompts for ``distserve bench``: a thin adapter over ``workloads.py``.

Owns turning a ``--dataset`` spec into :class:`BenchPrompt` s that a live endpoint can take —
token ids of the requested lengths, or text that the server's tokenizer turns into about that
many tokens (``--prompt-as-text``, needs ``--tokenizer``). Lengths, shared prefixes and trace
timestamps come from the workload generators; this module adds only what they leave out: the
ShareGPT prompt *text* (``workloads.sharegpt`` keeps lengths only), keeping special tokens out of
random prompts, and the token-ids → text round trip.

    --dataset random | shared-prefix | sharegpt:PATH | mooncake:PATH
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from distserve.bench import workloads
from distserve.bench.workloads import WorkloadRequest


@dataclass(frozen=True)
class BenchPrompt:
    request_id: str
    client_id: str
    prompt: str | list[int]
    input_len: int  # tokens the prompt has (text: as the given tokenizer counts them)
    output_len: int  # tokens to ask for (max_tokens)
    trace_arrival_s: float  # the workload's own arrival time (traces keep their shape)


@dataclass(frozen=True)
class PromptOptions:
    num_prompts: int
    input_len: int = 256
    output_len: int | None = None  # None: the dataset's own lengths (random: 128)
    range_ratio: float = 0.0  # random: lengths uniform in [L·(1−r), L·(1+r)]
    prefix_len: int | None = None  # shared-prefix: default 3/4 of input_len
    num_prefix_groups: int = 8
    seed: int = 0
    as_text: bool = False
    # Token content only (lengths, prefix structure and trace timing stay those of ``seed``):
    # bench runs each rate, and its warm-up, on fresh content so that no rate is served from
    # the prefix cache the previous one filled. None: ``seed``.
    content_seed: int | None = None


DEFAULT_OUTPUT_LEN = 128


def _content_seed(opts: PromptOptions) -> int:
    return opts.seed if opts.content_seed is None else opts.content_seed


def build_prompts(
    dataset: str, opts: PromptOptions, vocab_size: int | None, tokenizer: Any | None
) -> list[BenchPrompt]:
    """The prompts of ``dataset``; ``tokenizer`` (a Hugging Face tokenizer) is needed for text
    prompts made from token ids, and improves ShareGPT lengths when given."""
    kind, _, path = dataset.partition(":")
    if kind in ("sharegpt", "mooncake") and not path:
        raise ValueError(f"--dataset {kind} needs a file: {kind}:PATH")
    if kind == "sharegpt":
        return _sharegpt(Path(path), opts, tokenizer)
    if kind == "random":
        reqs = _random(opts)
    elif kind == "shared-prefix":
        reqs = _shared_prefix(opts)
    elif kind == "mooncake":
        reqs = workloads.mooncake(path, num_requests=opts.num_prompts)
        if opts.output_len is not None:
            reqs = [_with_output(r, opts.output_len) for r in reqs]
    else:
        raise ValueError(
            f"unknown dataset {dataset!r}; use random, shared-prefix, sharegpt:PATH or mooncake:PATH"
        )
    if vocab_size is None:
        raise ValueError(
            "token-id prompts need the vocabulary size: pass --vocab-size or --tokenizer"
        )
    if opts.as_text and tokenizer is None:
        raise ValueError("--prompt-as-text needs --tokenizer (the served model's folder)")
    allowed = _allowed_ids(vocab_size, tokenizer)
    if opts.as_text:
        allowed = _text_safe_ids(allowed, tokenizer)
    out = []
    for req in reqs:
        ids = [
            int(allowed[t % len(allowed)])
            for t in workloads.to_token_ids(req, 1 << 30, _content_seed(opts))
        ]
        prompt: str | list[int] = ids
        input_len = len(ids)
        if opts.as_text:
            prompt, input_len = _as_text(ids, tokenizer, allowed, _content_seed(opts))
        out.append(
            BenchPrompt(
                req.request_id, req.client_id, prompt, input_len, req.output_len, req.arrival_s
            )
        )
    return out


def _random(opts: PromptOptions) -> list[WorkloadRequest]:
    def span(n: int) -> tuple[int, int]:
        return max(1, int(n * (1 - opts.range_ratio))), max(1, int(n * (1 + opts.range_ratio)))

    return workloads.random_lengths(
        num_requests=opts.num_prompts,
        input_len_range=span(opts.input_len),
        output_len_range=span(opts.output_len or DEFAULT_OUTPUT_LEN),
        seed=opts.seed,
    )


def _shared_prefix(opts: PromptOptions) -> list[WorkloadRequest]:
    block_size = 16  # the prefix is a whole number of blocks of the workload's block ids
    wanted = opts.prefix_len if opts.prefix_len is not None else opts.input_len * 3 // 4
    prefix_len = max(1, wanted // block_size) * block_size
    if prefix_len >= opts.input_len:
        raise ValueError(
            f"shared-prefix: the prefix ({prefix_len} tokens, whole {block_size}-token blocks) "
            f"must be shorter than --input-len {opts.input_len}"
        )
    return workloads.shared_prefix(
        num_requests=opts.num_prompts,
        num_groups=opts.num_prefix_groups,
        prefix_len=prefix_len,
        suffix_len=opts.input_len - prefix_len,
        output_len=opts.output_len or DEFAULT_OUTPUT_LEN,
        block_size=block_size,
        seed=opts.seed,
    )


def _with_output(req: WorkloadRequest, output_len: int) -> WorkloadRequest:
    return replace(req, output_len=output_len)


def _allowed_ids(vocab_size: int, tokenizer: Any | None) -> np.ndarray:
    """Token ids a random prompt may use: the vocabulary without special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer else set()
    ids = np.array([i for i in range(vocab_size) if i not in special], dtype=np.int64)
    if ids.size == 0:
        raise ValueError(f"no usable token ids in a vocabulary of {vocab_size}")
    return ids


def _text_safe_ids(allowed: np.ndarray, tokenizer: Any) -> np.ndarray:
    """The ids whose text encodes back to exactly that id (no partial UTF-8, no odd spaces),
    so that random text prompts re-tokenize to about as many tokens as they were made of."""
    ids = allowed.tolist()
    texts = tokenizer.batch_decode([[i] for i in ids])
    again = tokenizer(texts, add_special_tokens=False)["input_ids"]
    safe = np.array([i for i, e in zip(ids, again) if e == [i]], dtype=np.int64)
    return safe if safe.size else allowed


def _as_text(ids: list[int], tokenizer: Any, allowed: np.ndarray, seed: int) -> tuple[str, int]:
    """Text the tokenizer turns back into ``len(ids)`` tokens, or very nearly."""
    target = len(ids)
    rng = np.random.default_rng([seed, target, *ids[:4]])
    text = tokenizer.decode(ids)
    for _ in range(8):
        again = list(tokenizer.encode(text, add_special_tokens=False))
        if len(again) == target:
            break
        if len(again) > target:
            again = again[:target]
        else:
            again += rng.choice(allowed, size=target - len(again)).tolist()
        text = tokenizer.decode(again)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def _sharegpt(path: Path, opts: PromptOptions, tokenizer: Any | None) -> list[BenchPrompt]:
    """ShareGPT prompts as text (the first turn), lengths from ``workloads.sharegpt``."""
    tokenize = (
        (lambda s: list(tokenizer.encode(s, add_special_tokens=False))) if tokenizer else None
    )
    reqs = workloads.sharegpt(
        path, num_requests=opts.num_prompts, tokenize=tokenize, seed=opts.seed
    )
    # The same conversations workloads.sharegpt keeps: those with at least two turns, in order.
    texts = [
        conv["conversations"][0]["value"]
        for conv in json.loads(path.read_text())
        if len(conv.get("conversations", [])) >= 2
    ][: len(reqs)]
    if len(texts) != len(reqs):
        raise ValueError(f"{path}: could not match prompts to the workload's requests")
    return [
        BenchPrompt(
            r.request_id,
            r.client_id,
            text,
            r.input_len,
            opts.output_len or r.output_len,
            r.arrival_s,
        )
        for r, text in zip(reqs, texts)
    ]
