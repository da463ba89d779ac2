"""What the router's front ends (gRPC ``Generation``, OpenAI HTTP) exchange with its core.

    front end ──FrontRequest──▶ RouterCore.generate() ──▶ async stream of FrontChunk
                                 (validate, tokenize, route, prefill, decode, detokenize)

``RouterCore.generate`` raises :class:`InvalidRequestError` for bad input before yielding
anything, and :class:`ServiceError` when the cluster cannot serve the request; closing the
stream early (client gone) aborts the request on every instance it touched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from distserve.engine.sampling_params import SamplingParams


class InvalidRequestError(ValueError):
    """The request is malformed (maps to gRPC INVALID_ARGUMENT / HTTP 400)."""


class ServiceError(RuntimeError):
    """The cluster could not serve a valid request (maps to gRPC UNAVAILABLE / HTTP 503)."""


@dataclass
class FrontRequest:
    sampling_params: SamplingParams
    prompt_text: str | None = None  # exactly one of prompt_text / prompt_token_ids
    prompt_token_ids: Sequence[int] | None = None
    request_id: str = ""  # empty: the core makes one
    client_id: str = ""  # fairness key; empty = the shared anonymous client


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from an instance's prefix cache


@dataclass
class FrontChunk:
    request_id: str
    token_ids: list[int] = field(default_factory=list)  # generated since the previous chunk
    text: str = ""  # released since the previous chunk
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last chunk
    usage: Usage | None = None  # on the last chunk
    prefill_instance: str = ""
    decode_instance: str = ""


class RouterFrontend(Protocol):
    """The part of the router core that front ends use."""

    model_name: str
    max_model_len: int
    tokenizer: Any  # a Hugging Face tokenizer (chat templates, encoding)

    def generate(self, request: FrontRequest) -> AsyncIterator[FrontChunk]: ...
