"""What the SDK hands back: streamed chunks, finished completions with their timings, model info.

Timings are measured on the client (ALGORITHMS.md §1), from ``time.perf_counter()`` readings:

    send ─────────── first token ──── token ── token ─── ... ── last token (finish)
    |<──── ttft_s ───>|<── (last − first) / (completion tokens − 1) = tpot_s ──>|
    |<──────────────────────────────── e2e_s ──────────────────────────────────>|

A chunk may carry several tokens; its arrival time counts for all of them.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from distserve._proto import generation_pb2


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from an instance's prefix cache


@dataclass(frozen=True)
class StreamChunk:
    """One streamed piece of a completion."""

    request_id: str
    token_ids: list[int]  # tokens generated since the previous chunk
    text: str  # text released since the previous chunk
    finish_reason: str | None  # "stop" | "length" | "abort" on the last chunk, else None
    arrival_s: float  # time.perf_counter() when the chunk arrived
    elapsed_s: float  # seconds since the request was sent
    usage: TokenUsage | None = None  # on the last chunk
    prefill_instance: str = ""
    decode_instance: str = ""


@dataclass(frozen=True)
class Completion:
    """A finished request: its tokens, text and client-side timings."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    usage: TokenUsage
    ttft_s: float | None  # None when no token came back
    tpot_s: float | None  # None with fewer than two output tokens
    e2e_s: float
    prefill_instance: str = ""
    decode_instance: str = ""
    itl_s: list[float] = field(default_factory=list)  # gaps between token-bearing chunks


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    vocab_size: int
    max_model_len: int
    num_prefill_instances: int
    num_decode_instances: int
    num_colocated_instances: int
    routing_policy: str


def model_info_from_proto(msg: generation_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model_name=msg.model_name,
        vocab_size=msg.vocab_size,
        max_model_len=msg.max_model_len,
        num_prefill_instances=msg.num_prefill_instances,
        num_decode_instances=msg.num_decode_instances,
        num_colocated_instances=msg.num_colocated_instances,
        routing_policy=msg.routing_policy,
    )


class CompletionBuilder:
    """Turns the responses of one ``Generate`` call into chunks, then into a :class:`Completion`."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.send_s = time.perf_counter()
        self.token_ids: list[int] = []
        self.texts: list[str] = []
        self.token_times_s: list[float] = []  # arrival of each token-bearing chunk
        self.finish_reason: str | None = None
        self.usage: TokenUsage | None = None
        self.prefill_instance = ""
        self.decode_instance = ""
        self.end_s = self.send_s

    def add(
        self, resp: generation_pb2.GenerateResponse, arrival_s: float | None = None
    ) -> StreamChunk:
        """The chunk for ``resp``, which arrived at ``arrival_s`` (``time.perf_counter()``;
        None: now)."""
        now = time.perf_counter() if arrival_s is None else arrival_s
        self.end_s = now
        self.request_id = resp.request_id or self.request_id
        token_ids = list(resp.token_ids)
        if token_ids:
            self.token_ids.extend(token_ids)
            self.token_times_s.append(now)
        self.texts.append(resp.text)
        self.prefill_instance = resp.prefill_instance or self.prefill_instance
        self.decode_instance = resp.decode_instance or self.decode_instance
        usage = None
        if resp.HasField("usage"):
            u = resp.usage
            usage = TokenUsage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
            self.usage = usage
        finish = resp.finish_reason or None
        self.finish_reason = finish or self.finish_reason
        return StreamChunk(
            request_id=self.request_id,
            token_ids=token_ids,
            text=resp.text,
            finish_reason=finish,
            arrival_s=now,
            elapsed_s=now - self.send_s,
            usage=usage,
            prefill_instance=resp.prefill_instance,
            decode_instance=resp.decode_instance,
        )

    def build(self) -> Completion:
        times = self.token_times_s
        num_tokens = len(self.token_ids)
        ttft = times[0] - self.send_s if times else None
        tpot = (times[-1] - times[0]) / (num_tokens - 1) if times and num_tokens > 1 else None
        usage = self.usage or TokenUsage(completion_tokens=num_tokens)
        return Completion(
            request_id=self.request_id,
            token_ids=list(self.token_ids),
            text="".join(self.texts),
            finish_reason=self.finish_reason or "",
            usage=usage,
            ttft_s=ttft,
            tpot_s=tpot,
            e2e_s=self.end_s - self.send_s,
            prefill_instance=self.prefill_instance,
            decode_instance=self.decode_instance,
            itl_s=[b - a for a, b in itertools.pairwise(times)],
        )
