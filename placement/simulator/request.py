"""One simulated request's mutable state and its finished record.

Owns the per-request bookkeeping the instances update (tokens computed, blocks held, times) and
:class:`RequestRecord`, the immutable result the metrics read. Lifecycle (disaggregated)::

    arrive ─▶ routed ─▶ waiting@prefill ─▶ prefilling ─▶ first token ─▶ waiting@decode (KV leased
    on prefill) ─▶ KV transfer ─▶ decoding ─▶ finished            (colocated: no transfer step)
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve.bench.workloads import WorkloadRequest
from distserve.router.policies.base import RouteRequest


class SimRequest:
    """Mutable state of a request inside the simulator (slots: many of them, hot loop)."""

    __slots__ = (
        "decode_id",
        "decode_private_blocks",
        "finish_s",
        "first_token_s",
        "hashes",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed",
        "num_prompt_blocks",
        "num_scheduled",
        "num_total_blocks",
        "output_len",
        "prefill_admit_s",
        "prefill_id",
        "prefill_private_blocks",
        "prompt_len",
        "route",
        "w",
    )

    def __init__(self, w: WorkloadRequest, route: RouteRequest) -> None:
        self.w = w
        self.route = route
        self.hashes = route.block_hashes
        self.prompt_len = w.input_len
        self.output_len = w.output_len
        self.num_prompt_blocks = -(-w.input_len // w.block_size)
        self.num_total_blocks = -(-(w.input_len + w.output_len) // w.block_size)  # prompt + output
        self.prefill_id = ""
        self.decode_id = ""
        self.num_cached_blocks = 0
        self.num_cached_tokens = 0
        self.num_computed = 0  # prompt tokens computed (incl. cached)
        self.num_scheduled = 0  # prompt tokens computed or in a batch in flight
        self.prefill_private_blocks = 0
        self.decode_private_blocks = 0
        self.prefill_admit_s = -1.0
        self.first_token_s = -1.0
        self.finish_s = -1.0

    def record(self) -> RequestRecord:
        w = self.w
        out = w.output_len
        return RequestRecord(
            request_id=w.request_id,
            client_id=w.client_id,
            arrival_s=w.arrival_s,
            prefill_admit_s=self.prefill_admit_s,
            first_token_s=self.first_token_s,
            finish_s=self.finish_s,
            ttft_s=self.first_token_s - w.arrival_s,
            tpot_s=(self.finish_s - self.first_token_s) / (out - 1) if out > 1 else 0.0,
            e2e_s=self.finish_s - w.arrival_s,
            input_len=w.input_len,
            output_len=out,
            num_cached_tokens=self.num_cached_tokens,
            prefill_instance=self.prefill_id,
            decode_instance=self.decode_id,
        )


@dataclass(frozen=True)
class RequestRecord:
    """A finished request, with DistServe's metric definitions (ALGORITHMS.md §1)."""

    request_id: str
    client_id: str
    arrival_s: float
    prefill_admit_s: float  # admitted by the prefill instance's scheduler
    first_token_s: float
    finish_s: float
    ttft_s: float
    tpot_s: float  # (finish − first token) / (output − 1); 0 for one-token outputs
    e2e_s: float
    input_len: int
    output_len: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    prefill_instance: str
    decode_instance: str  # equal to prefill_instance when colocated
