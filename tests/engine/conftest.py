from __future__ import annotations

from distserve.engine.request import Request
from distserve.engine.sampling_params import SamplingParams


def make_request(rid: str, prompt: list[int], max_tokens: int = 8, **params) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
        eos_token_ids=frozenset({0}),
        max_model_len=4096,
    )
