"""One request's state inside an engine, from admission to finish.

    WAITING ──schedule──▶ RUNNING ──finish──▶ FINISHED_{STOPPED,LENGTH,ABORTED}
       ▲                    │  │
       └────preempt─────────┘  └─(prefill role, first token)─▶ PREFILLED ──pulled/expired──▶ FINISHED
                            ▲
    decode role: AWAITING_KV ──room──▶ TRANSFERRING ──KV arrived──┘

Preempted requests free their blocks and are recomputed from scratch when readmitted.

Token accounting (all tokens = prompt + generated so far):

    | prompt_token_ids ............ | output_token_ids ..... |
    | computed (KV in cache) ........................ | new |   <- num_computed_tokens
    | cached prefix | <- num_cached_tokens (hit in the prefix cache at admission)

A step computes ``num_tokens - num_computed_tokens`` tokens (capped by the token budget); when
that reaches the end of the known tokens the step also samples the next one.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from distserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREFILLED = "prefilled"  # prefill role: first token sampled, blocks leased until pulled
    AWAITING_KV = "awaiting_kv"  # decode role: waiting for room to pull its KV
    TRANSFERRING = "transferring"  # decode role: blocks allocated, KV pull in flight
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the model's context length
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
}


@dataclass
class TokenLogprobs:
    """Log-probabilities for one generated token."""

    token_id: int
    logprob: float
    top: dict[int, float]  # the ``SamplingParams.logprobs`` most likely tokens


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int  # prompt + output never exceeds this
    client_id: str = ""
    arrival_s: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at (first) admission
    num_preemptions: int = 0
    block_hashes: list[int] = field(
        default_factory=list
    )  # hashes of every full block of all tokens
    generator: torch.Generator | None = None  # per-request RNG when the request has a seed
    first_token_s: float | None = None
    finished_s: float | None = None

    def __post_init__(self) -> None:
        if self.sampling_params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.sampling_params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output without building the concatenation."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def check_stop(self, token_id: int) -> RequestStatus | None:
        """Whether appending ``token_id`` (already appended) ends the request."""
        params = self.sampling_params
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
