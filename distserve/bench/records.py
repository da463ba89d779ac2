"""What the load generator records for each request it sends (the input to every statistic).

Times are seconds of ``time.perf_counter()`` (``send_s``) or durations. The same record
comes from every backend, so gRPC and OpenAI-compatible servers are measured alike:

    send ──── first token ─── token ─── ... ─── last token
    |<─ ttft_s ─>|<─ itl_s[0] ─>|     ...           |
    |<──────────────────── e2e_s ───────────────────>|
    tpot_s = (last token − first token) / (output_len − 1)      (ALGORITHMS.md §1)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    request_id: str
    expected_output_len: int  # what was asked for (max_tokens)
    input_len: int  # prompt tokens: the server's count when it reports usage, else the intended
    send_s: float = 0.0  # time.perf_counter() when the request was sent
    is_success: bool = False
    error: str = ""  # why it failed ("" on success)
    output_len: int = 0  # tokens received: the server's usage count when reported
    ttft_s: float | None = None
    tpot_s: float | None = None  # None with fewer than two output tokens
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between token-bearing events

    def finish(self, token_times_s: list[float], end_s: float, num_output_tokens: int) -> None:
        """Fill the timings from the arrival times of token-bearing events (absolute clock)."""
        self.output_len = num_output_tokens
        self.e2e_s = end_s - self.send_s
        if token_times_s:
            self.ttft_s = token_times_s[0] - self.send_s
            self.itl_s = [b - a for a, b in itertools.pairwise(token_times_s)]
            if num_output_tokens > 1:
                self.tpot_s = (token_times_s[-1] - token_times_s[0]) / (num_output_tokens - 1)
        self.is_success = bool(token_times_s) or num_output_tokens > 0
        if not self.is_success:
            self.error = "the server answered without any output token"

    def fail(self, error: str, end_s: float) -> None:
        self.is_success = False
        self.error = error[:300]
        self.e2e_s = end_s - self.send_s
