"""Sampling parameters of one request, validated when built.

Every invalid value raises ``ValueError`` naming the field, so the CLI, the gRPC front
(``INVALID_ARGUMENT``) and the HTTP API (400) can pass the message to the user unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens to generate at most
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass in (0, 1]
    top_k: int = 0  # 0 (or -1) disables top-k
    seed: int | None = None  # per-request RNG seed; same seed, same params -> same tokens
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before the first match
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end generation (kept in token_ids)
    ignore_eos: bool = False  # keep going past the model's end-of-sequence token
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # return the chosen token's logprob and this many top logprobs
    skip_special_tokens: bool = True
    extra: dict[str, object] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Accept lists / a single string from callers and store immutable tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        if (
            not isinstance(self.max_tokens, int)
            or isinstance(self.max_tokens, bool)
            or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(
                f"top_k must be an integer >= 0 (or -1 to disable), got {self.top_k!r}"
            )
        if self.seed is not None and (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not 0 <= self.seed <= _MAX_SEED
        ):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int)
            or isinstance(self.logprobs, bool)
            or self.logprobs < 0
        ):
            raise ValueError(f"logprobs must be an integer >= 0 or None, got {self.logprobs!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN
