"""Which KV heads each decode rank takes from which prefill rank when the two TP degrees differ.

Owns the pure mapping (spec, prefill tp, decode tp) -> head slices. It does not move bytes and
knows nothing of global ranks or block ids (see ``sender.py`` / ``receiver.py``).

Rank ``r`` of an instance with TP ``t`` owns the global heads ``spec.kv_head_range(r, t)``. For
each decode rank we walk its global heads, find the prefill ranks holding each one, and group
runs of consecutive heads with the same source into one slice. Where a head is replicated on
several prefill ranks (``num_kv_heads < prefill tp``) we take it from holder
``dst_tp_rank % num_holders`` so that decode ranks sharing a head spread their pulls over the
replicas instead of all reading from the first one::

    num_kv_heads=4, prefill tp=2, decode tp=4       num_kv_heads=1, prefill tp=2, decode tp=2
    prefill r0: heads 0 1   prefill r1: heads 2 3   prefill r0: head 0   prefill r1: head 0
      |-- h0 --> decode r0     |-- h2 --> decode r2     |-- h0 --> decode r0
      '-- h1 --> decode r1     '-- h3 --> decode r3                 prefill r1 -- h0 --> decode r1

Every decode rank receives exactly the heads it owns, each exactly once, and a (src, dst) pair
carries at most one slice (both ownership ranges are contiguous).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from distserve.engine.kv_spec import KVCacheSpec


@dataclass(frozen=True)
class HeadSlice:
    """One (prefill tp rank -> decode tp rank) piece of a transfer, in rank-local head indices."""

    src_tp_rank: int  # prefill tensor-parallel rank that sends
    dst_tp_rank: int  # decode tensor-parallel rank that receives
    src_head_start: int  # first head to send, index into the source rank's local heads
    dst_head_start: int  # where it lands, index into the destination rank's local heads
    num_heads: int  # number of consecutive heads in this slice

    @property
    def src_heads(self) -> slice:
        return slice(self.src_head_start, self.src_head_start + self.num_heads)

    @property
    def dst_heads(self) -> slice:
        return slice(self.dst_head_start, self.dst_head_start + self.num_heads)


def _head_ranges(spec: KVCacheSpec, tp_size: int, side: str) -> list[tuple[int, int]]:
    if tp_size < 1:
        raise ValueError(f"{side} tensor-parallel size must be >= 1, got {tp_size}")
    try:
        return [spec.kv_head_range(rank, tp_size) for rank in range(tp_size)]
    except ValueError as err:
        raise ValueError(
            f"cannot plan a KV transfer: the {side} instance (TP={tp_size}) cannot hold "
            f"{spec.num_kv_heads} KV heads: {err}"
        ) from err


@functools.lru_cache(maxsize=64)
def plan_head_slices(spec: KVCacheSpec, src_tp: int, dst_tp: int) -> tuple[HeadSlice, ...]:
    """Head slices for a transfer from a TP=``src_tp`` instance to a TP=``dst_tp`` one.

    Sorted by (dst_tp_rank, dst_head_start); cached, since every transfer of a link asks for
    the same plan. Raises ``ValueError`` naming the side whose TP
    degree does not divide (or is not a multiple of) the number of KV heads.
    """
    src_ranges = _head_ranges(spec, src_tp, "prefill")
    dst_ranges = _head_ranges(spec, dst_tp, "decode")
    slices: list[HeadSlice] = []
    for dst_rank, (dst_start, dst_end) in enumerate(dst_ranges):
        run: HeadSlice | None = None
        for head in range(dst_start, dst_end):
            holders = [r for r, (s, e) in enumerate(src_ranges) if s <= head < e]
            src_rank = holders[dst_rank % len(holders)]
            src_local = head - src_ranges[src_rank][0]
            dst_local = head - dst_start
            if (
                run is not None
                and run.src_tp_rank == src_rank
                and run.src_head_start + run.num_heads == src_local
            ):
                run = HeadSlice(
                    src_rank, dst_rank, run.src_head_start, run.dst_head_start, run.num_heads + 1
                )
                continue
            if run is not None:
                slices.append(run)
            run = HeadSlice(src_rank, dst_rank, src_local, dst_local, 1)
        assert run is not None, "every decode rank owns at least one head"
        slices.append(run)
    pairs = [(s.src_tp_rank, s.dst_tp_rank) for s in slices]
    assert len(pairs) == len(set(pairs)), f"a (src, dst) pair got two slices: {slices}"
    return tuple(slices)
