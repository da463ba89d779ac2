"""Exact head-slice plans for every TP pairing the engine allows, and clear errors otherwise."""

from __future__ import annotations

import itertools

import pytest

from distserve.engine.kv_spec import KVCacheSpec
from distserve.transfer.plan import HeadSlice, plan_head_slices


def _spec(num_kv_heads: int) -> KVCacheSpec:
    return KVCacheSpec(
        num_layers=2, num_kv_heads=num_kv_heads, head_dim=8, block_size=4, dtype="float16"
    )


def _s(src: int, dst: int, src_start: int, dst_start: int, num: int) -> HeadSlice:
    return HeadSlice(src, dst, src_start, dst_start, num)


@pytest.mark.parametrize(
    ("num_kv_heads", "src_tp", "dst_tp", "expected"),
    [
        (4, 1, 1, [_s(0, 0, 0, 0, 4)]),
        (4, 1, 2, [_s(0, 0, 0, 0, 2), _s(0, 1, 2, 0, 2)]),
        (4, 2, 1, [_s(0, 0, 0, 0, 2), _s(1, 0, 0, 2, 2)]),
        (4, 2, 2, [_s(0, 0, 0, 0, 2), _s(1, 1, 0, 0, 2)]),
        (4, 4, 2, [_s(0, 0, 0, 0, 1), _s(1, 0, 0, 1, 1), _s(2, 1, 0, 0, 1), _s(3, 1, 0, 1, 1)]),
        (4, 2, 4, [_s(0, 0, 0, 0, 1), _s(0, 1, 1, 0, 1), _s(1, 2, 0, 0, 1), _s(1, 3, 1, 0, 1)]),
        (8, 2, 4, [_s(0, 0, 0, 0, 2), _s(0, 1, 2, 0, 2), _s(1, 2, 0, 0, 2), _s(1, 3, 2, 0, 2)]),
        # one KV head (MQA): replicated on every rank of a TP>1 instance
        (1, 1, 2, [_s(0, 0, 0, 0, 1), _s(0, 1, 0, 0, 1)]),
        (1, 2, 1, [_s(0, 0, 0, 0, 1)]),
        (1, 2, 2, [_s(0, 0, 0, 0, 1), _s(1, 1, 0, 0, 1)]),
        (1, 4, 2, [_s(0, 0, 0, 0, 1), _s(1, 1, 0, 0, 1)]),
        # two KV heads over more ranks: pairs of ranks share a head
        (2, 4, 1, [_s(0, 0, 0, 0, 1), _s(2, 0, 0, 1, 1)]),
        (2, 1, 4, [_s(0, 0, 0, 0, 1), _s(0, 1, 0, 0, 1), _s(0, 2, 1, 0, 1), _s(0, 3, 1, 0, 1)]),
        (2, 4, 4, [_s(0, 0, 0, 0, 1), _s(1, 1, 0, 0, 1), _s(2, 2, 0, 0, 1), _s(3, 3, 0, 0, 1)]),
        (2, 2, 4, [_s(0, 0, 0, 0, 1), _s(0, 1, 0, 0, 1), _s(1, 2, 0, 0, 1), _s(1, 3, 0, 0, 1)]),
    ],
)
def test_plan_is_exact(
    num_kv_heads: int, src_tp: int, dst_tp: int, expected: list[HeadSlice]
) -> None:
    assert list(plan_head_slices(_spec(num_kv_heads), src_tp, dst_tp)) == expected


@pytest.mark.parametrize(
    ("num_kv_heads", "src_tp", "dst_tp"),
    [(h, s, d) for h in (1, 2, 4, 8) for s, d in itertools.product((1, 2, 4, 8), repeat=2)],
)
def test_every_decode_rank_gets_exactly_its_heads_once(
    num_kv_heads: int, src_tp: int, dst_tp: int
) -> None:
    spec = _spec(num_kv_heads)
    slices = plan_head_slices(spec, src_tp, dst_tp)
    for dst_rank in range(dst_tp):
        dst_start, dst_end = spec.kv_head_range(dst_rank, dst_tp)
        received: list[int] = []
        for s in (s for s in slices if s.dst_tp_rank == dst_rank):
            src_start, src_end = spec.kv_head_range(s.src_tp_rank, src_tp)
            global_heads = list(
                range(src_start + s.src_head_start, src_start + s.src_head_start + s.num_heads)
            )
            assert global_heads[-1] < src_end  # the source really holds them
            assert [dst_start + s.dst_head_start + i for i in range(s.num_heads)] == global_heads
            received += global_heads
        assert sorted(received) == list(range(dst_start, dst_end))  # all owned heads, once each


@pytest.mark.parametrize(
    ("num_kv_heads", "src_tp", "dst_tp", "side"),
    [(6, 4, 2, "prefill"), (6, 2, 4, "decode"), (2, 3, 1, "prefill"), (4, 1, 3, "decode")],
)
def test_impossible_split_names_the_side(
    num_kv_heads: int, src_tp: int, dst_tp: int, side: str
) -> None:
    with pytest.raises(ValueError, match=f"the {side} instance \\(TP="):
        plan_head_slices(_spec(num_kv_heads), src_tp, dst_tp)


def test_non_positive_tp_is_an_error() -> None:
    with pytest.raises(ValueError, match="decode tensor-parallel size must be >= 1"):
        plan_head_slices(_spec(4), 1, 0)
