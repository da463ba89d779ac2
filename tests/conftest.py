"""Fixtures shared by the whole suite: tiny random checkpoints and a Hugging Face reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``tiny_models(arch, **overrides) -> Path``: a cached random checkpoint per shape."""
    from distserve.model.tiny_model import make_tiny_model

    made: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def get(arch: str = "llama", seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in made:
            made[key] = make_tiny_model(
                root / f"m{len(made)}-{arch}", arch=arch, seed=seed, **overrides
            )
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models("llama")


class HFReference:
    """Greedy decoding with the Hugging Face model: tokens and per-step log-probabilities."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Tokens and log-softmax rows [max_new_tokens, vocab]; never stops at EOS."""
        out = self.model(torch.tensor([prompt]), use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        tokens, rows = [], []
        for _ in range(max_new_tokens):
            rows.append(torch.log_softmax(logits.float(), -1))
            token = int(logits.argmax())
            tokens.append(token)
            out = self.model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        return tokens, torch.stack(rows)


@pytest.fixture(scope="session")
def hf_reference():
    cache: dict[Path, HFReference] = {}

    def get(path: Path) -> HFReference:
        if path not in cache:
            cache[path] = HFReference(path)
        return cache[path]

    return get
