"""KV transfer between real processes: a gloo world on 127.0.0.1, one process per rank.

The prefill instance takes global ranks 0..src_tp-1, the decode instance the next dst_tp ranks.
A second gloo group stands in for the gRPC control channel (the "post, then ask to send"
handshake). Every rank rebuilds the same random caches and requests from fixed seeds, so the
decode ranks know exactly what must have landed, and where nothing may have.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from distserve.engine.kv_spec import KVCacheSpec
from distserve.transfer import KVReceiver, KVSender, TransferState, create_backend
from distserve.transfer.chunking import DEFAULT_CHUNK_BYTES
from tests.transfer.kv_gloo_world import poll_until, run_gloo_world
from tests.transfer.kv_transfer_fixtures import (
    Pull,
    descriptor,
    expected_dst_cache,
    make_pulls,
    model_cache,
    rank_cache,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

NUM_SRC_BLOCKS, NUM_DST_BLOCKS = 64, 80


@dataclass(frozen=True)
class Scenario:
    spec: KVCacheSpec
    src_tp: int
    dst_tp: int
    block_counts: tuple[int, ...]
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    is_posted_inline: bool = True  # False: even a pair's only chunk goes via the poster thread

    @property
    def src_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.src_tp))

    @property
    def dst_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.src_tp, self.src_tp + self.dst_tp))

    def pulls(self) -> list[Pull]:
        return make_pulls(list(self.block_counts), NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=17)


class Rank:
    """One process's view: its caches, its endpoint, and the control group."""

    def __init__(self, rank: int, scenario: Scenario) -> None:
        self.rank, self.scenario, self.spec = rank, scenario, scenario.spec
        self.control = dist.new_group(backend="gloo")  # every rank, same order
        self.full_src = model_cache(self.spec, NUM_SRC_BLOCKS, seed=1)
        self.full_dst = model_cache(self.spec, NUM_DST_BLOCKS, seed=2)
        self.backend = backend = create_backend(
            "gloo", torch.device("cpu"), allow_inline_posts=scenario.is_posted_inline
        )
        self.is_decode = rank in scenario.dst_ranks
        if self.is_decode:
            self.tp_rank = scenario.dst_ranks.index(rank)
            self.initial = rank_cache(self.full_dst, self.spec, self.tp_rank, scenario.dst_tp)
            self.receiver = KVReceiver(
                self.initial.clone(),
                rank,
                backend,
                timeout_s=20.0,
                chunk_bytes=scenario.chunk_bytes,
            )
        else:
            self.tp_rank = rank
            cache = rank_cache(self.full_src, self.spec, self.tp_rank, scenario.src_tp)
            self.sender = KVSender(
                cache, rank, backend, timeout_s=20.0, chunk_bytes=scenario.chunk_bytes
            )

    def close(self) -> None:
        endpoint = self.receiver if self.is_decode else self.sender
        assert (endpoint.num_active, endpoint.num_buffers_in_use) == (0, 0)
        dist.barrier(group=self.control)  # nobody tears down while a peer still polls
        self.backend.close()

    def desc(self, pull: Pull, seq_no: int):
        return descriptor(self.spec, pull, seq_no, self.scenario.src_ranks, self.scenario.dst_ranks)

    def handshake(self) -> None:
        """Decode ranks have posted; prefill ranks may send (the control channel's job)."""
        dist.barrier(group=self.control)

    def assert_landed(self, pulls: list[Pull]) -> None:
        expected = expected_dst_cache(
            self.initial, self.full_src, self.spec, pulls, self.tp_rank, self.scenario.dst_tp
        )
        assert torch.equal(self.receiver._cache, expected)


def _concurrent_pulls(rank: int, world_size: int, scenario: Scenario) -> None:
    me = Rank(rank, scenario)
    pulls = scenario.pulls()
    if me.is_decode:
        for seq_no, pull in enumerate(pulls):
            me.receiver.post_recv(me.desc(pull, seq_no), pull.dst_block_ids)
        me.handshake()
        results = poll_until(me.receiver, len(pulls))
        assert all(r.is_ok for r in results), results
        per_block = scenario.spec.block_bytes(scenario.dst_tp)
        assert sum(r.num_bytes for r in results) == sum(scenario.block_counts) * per_block
        me.assert_landed(pulls)
    else:
        me.handshake()
        order = list(enumerate(pulls))
        random.Random(rank).shuffle(order)  # each prefill rank is asked in its own order
        for seq_no, pull in order:
            me.sender.start_send(me.desc(pull, seq_no), pull.src_block_ids)
        results = poll_until(me.sender, len(pulls))
        assert all(r.is_ok for r in results), results
    me.close()


@pytest.mark.parametrize(
    ("src_tp", "dst_tp", "dtype", "chunk_bytes"),
    [
        (2, 1, "float16", DEFAULT_CHUNK_BYTES),
        (1, 2, "bfloat16", DEFAULT_CHUNK_BYTES),
        (2, 1, "float16", 7000),  # pairs carry 3 KiB per block: 2 blocks per chunk
        (1, 2, "bfloat16", 3000),  # below one block: 1 block per chunk
    ],
    ids=["tp2to1", "tp1to2", "tp2to1-chunked", "tp1to2-chunk-per-block"],
)
def test_concurrent_pulls_land_exactly_their_heads(
    src_tp: int, dst_tp: int, dtype: str, chunk_bytes: int
) -> None:
    spec = KVCacheSpec(num_layers=3, num_kv_heads=4, head_dim=16, block_size=8, dtype=dtype)
    scenario = Scenario(
        spec, src_tp, dst_tp, block_counts=(5, 1, 12, 7, 3), chunk_bytes=chunk_bytes
    )
    run_gloo_world(_concurrent_pulls, src_tp + dst_tp, scenario)


def _asked_out_of_order(rank: int, world_size: int, scenario: Scenario) -> None:
    me = Rank(rank, scenario)
    a, b, c = scenario.pulls()
    if me.is_decode:
        for seq_no, pull in enumerate((a, b, c)):
            me.receiver.post_recv(me.desc(pull, seq_no), pull.dst_block_ids)
        me.handshake()
        results = poll_until(me.receiver, 3)
        assert [r.state for r in results] == [TransferState.DONE] * 3, results
        me.assert_landed([a, b, c])
    else:
        me.handshake()
        sender = me.sender
        sender.start_send(me.desc(c, 2), c.src_block_ids)
        time.sleep(0.2)
        assert sender.poll() == [] and sender.state("req-2") is TransferState.QUEUED
        sender.start_send(me.desc(a, 0), a.src_block_ids)
        time.sleep(0.2)
        early = sender.poll()  # a may be done already; c must still wait for b
        assert sender.state("req-2") is TransferState.QUEUED
        sender.start_send(me.desc(b, 1), b.src_block_ids)
        assert sender.state("req-2") is TransferState.IN_FLIGHT
        results = early + poll_until(sender, 3 - len(early))
        assert sorted(r.transfer_id for r in results if r.is_ok) == ["req-0", "req-1", "req-2"]
    me.close()


@pytest.mark.parametrize("chunk_bytes", [DEFAULT_CHUNK_BYTES, 1100], ids=["1chunk", "chunked"])
def test_transfers_arrive_in_posted_order_when_asked_c_a_b(chunk_bytes: int) -> None:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
    # different sizes: a send matched to the wrong receive would fail loudly in gloo; with
    # 512-byte blocks and 1100-byte chunks, a, b, c travel as 2, 3 and 5 chunks
    is_inline = chunk_bytes == DEFAULT_CHUNK_BYTES  # the chunked run uses the poster thread
    scenario = Scenario(spec, 1, 1, (3, 6, 9), chunk_bytes, is_posted_inline=is_inline)
    run_gloo_world(_asked_out_of_order, 2, scenario)


def _cancel_and_void(rank: int, world_size: int, scenario: Scenario) -> None:
    me = Rank(rank, scenario)
    a, b, c, d = scenario.pulls()
    if me.is_decode:
        receiver = me.receiver
        receiver.post_recv(me.desc(a, 0), a.dst_block_ids)
        receiver.post_recv(me.desc(b, 1), b.dst_block_ids)
        assert receiver.cancel("req-0")
        assert [(r.transfer_id, r.state) for r in receiver.poll()] == [
            ("req-0", TransferState.CANCELLED)
        ]
        me.handshake()  # the prefill side never hears of the cancel and sends a anyway
        assert [(r.transfer_id, r.state) for r in poll_until(receiver, 1)] == [
            ("req-1", TransferState.DONE)
        ]
        me.assert_landed([b])  # a's blocks untouched although its bytes arrived
        receiver.post_recv(me.desc(c, 2), c.dst_block_ids)
        receiver.post_recv(me.desc(d, 3), d.dst_block_ids)
        me.handshake()
        results = {r.transfer_id: r for r in poll_until(receiver, 2)}
        assert results["req-2"].state is TransferState.FAILED
        assert "sent no KV" in (results["req-2"].error or "")
        assert results["req-3"].state is TransferState.DONE
        me.assert_landed([b, d])
    else:
        me.handshake()
        for seq_no, pull in enumerate((a, b)):
            me.sender.start_send(me.desc(pull, seq_no), pull.src_block_ids)
        assert all(r.is_ok for r in poll_until(me.sender, 2))
        me.handshake()
        me.sender.start_void_send(me.desc(c, 2), "lease expired")
        me.sender.start_send(me.desc(d, 3), d.src_block_ids)
        assert [r.state for r in poll_until(me.sender, 2)] == [
            TransferState.CANCELLED,
            TransferState.DONE,
        ]
    me.close()


@pytest.mark.parametrize("chunk_bytes", [DEFAULT_CHUNK_BYTES, 1100], ids=["1chunk", "chunked"])
def test_cancel_after_post_and_void_send_keep_the_pair_working(chunk_bytes: int) -> None:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
    is_inline = chunk_bytes == DEFAULT_CHUNK_BYTES  # the chunked run uses the poster thread
    scenario = Scenario(spec, 1, 1, (4, 5, 6, 7), chunk_bytes, is_posted_inline=is_inline)
    run_gloo_world(_cancel_and_void, 2, scenario)


def _cancel_mid_stream(rank: int, world_size: int, scenario: Scenario) -> None:
    me = Rank(rank, scenario)
    big, after = scenario.pulls()
    if me.is_decode:
        receiver = me.receiver
        receiver.post_recv(me.desc(big, 0), big.dst_block_ids)
        receiver.post_recv(me.desc(after, 1), after.dst_block_ids)
        me.handshake()
        first = big.dst_block_ids[0]  # chunk 0 holds it; wait until it visibly landed
        deadline = time.monotonic() + 10.0
        while torch.equal(receiver._cache[:, :, first], me.initial[:, :, first]):
            assert time.monotonic() < deadline, "chunk 0 never landed"
        assert receiver.cancel("req-0")  # later chunks are still on their way, or landing
        results = poll_until(receiver, 2)
        assert _states(results) == {"req-0": TransferState.CANCELLED, "req-1": TransferState.DONE}
        cache, src = receiver._cache, me.full_src
        for dst_id, src_id in zip(big.dst_block_ids, big.src_block_ids):
            block = cache[:, :, dst_id]  # untouched, or exactly its KV: never anything else
            assert torch.equal(block, me.initial[:, :, dst_id]) or torch.equal(
                block, src[:, :, src_id]
            )
        expected = me.initial.clone()
        expected[:, :, big.dst_block_ids] = cache[:, :, big.dst_block_ids]
        expected[:, :, after.dst_block_ids] = src[:, :, after.src_block_ids]
        assert torch.equal(cache, expected)  # nothing outside the two transfers' blocks moved
    else:
        me.handshake()
        for seq_no, pull in enumerate((big, after)):
            me.sender.start_send(me.desc(pull, seq_no), pull.src_block_ids)
        assert all(r.is_ok for r in poll_until(me.sender, 2))
    me.close()


def test_receiver_cancel_while_chunks_stream_in() -> None:
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, block_size=64, dtype="float32")
    # 256 KiB blocks, one per chunk: 40 chunks, the first landed when the cancel comes
    scenario = Scenario(spec, 1, 1, (40, 3), chunk_bytes=256 << 10, is_posted_inline=False)
    run_gloo_world(_cancel_mid_stream, 2, scenario)


def _states(results: list) -> dict:
    return {r.transfer_id: r.state for r in results}
