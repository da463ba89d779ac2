"""Pipelined transfers: a (transfer, pair) split into chunks, on the in-process backend.

The spec's block is 384 bytes with every head (192 with half of them), so a ``chunk_bytes`` of
two blocks cuts the small test transfers into many chunks, most of them not dividing evenly.
"""

from __future__ import annotations

import pytest
import torch

from distserve.transfer import KVReceiver, KVSender, TransferResult, TransferState
from distserve.transfer.chunking import ChunkSpan, plan_chunks
from distserve.transfer.wire import (
    MessageHeader,
    MessageKind,
    read_header,
    transfer_tag,
    write_header,
)
from tests.transfer.kv_inprocess_cluster import NUM_DST_BLOCKS, NUM_SRC_BLOCKS, SPEC, Cluster
from tests.transfer.kv_transfer_fixtures import Pull, make_pulls

BLOCK_BYTES = SPEC.block_bytes()  # 384
TWO_BLOCKS = 2 * BLOCK_BYTES


def _states(results: list[TransferResult]) -> dict[str, TransferState]:
    return {r.transfer_id: r.state for r in results}


def _record_headers(cluster: Cluster) -> list[tuple[int, MessageHeader]]:
    """(destination rank, header) of every message the fabric is given to send, in order."""
    sent: list[tuple[int, MessageHeader]] = []
    post = cluster.fabric.post

    def recording_post(src, dst, message, is_send, on_arrival=None):  # type: ignore[no-untyped-def]
        if is_send:
            sent.append((dst, read_header(message)))
        return post(src, dst, message, is_send, on_arrival)

    cluster.fabric.post = recording_post  # type: ignore[method-assign]
    return sent


def _chunk_blocks(pull: Pull, chunk_bytes: int, block_bytes: int = BLOCK_BYTES) -> list[list[int]]:
    """The destination block ids of each chunk of ``pull`` on one pair."""
    spans = plan_chunks(len(pull.dst_block_ids), block_bytes, chunk_bytes)
    return [pull.dst_block_ids[span.blocks] for span in spans]


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 7, 16, 33])
@pytest.mark.parametrize("blocks_per_chunk", [1, 2, 3, 5, 40])
def test_plan_covers_every_block_once_in_even_chunks(
    num_blocks: int, blocks_per_chunk: int
) -> None:
    spans = plan_chunks(num_blocks, 100, blocks_per_chunk * 100 + 99)  # a partial block rounds down
    assert len(spans) == -(-num_blocks // blocks_per_chunk)
    assert [s.first_block for s in spans] == [
        sum(x.num_blocks for x in spans[:i]) for i in range(len(spans))
    ]
    assert sum(s.num_blocks for s in spans) == num_blocks
    sizes = {s.num_blocks for s in spans}
    assert max(sizes) <= blocks_per_chunk and max(sizes) - min(sizes) <= 1
    assert [(s.index, s.num_chunks) for s in spans] == [(i, len(spans)) for i in range(len(spans))]


def test_plan_edges_and_bad_chunk_size() -> None:
    assert plan_chunks(5, 100, 10) == tuple(ChunkSpan(i, 5, i, 1) for i in range(5))  # >= 1 block
    assert plan_chunks(5, 100, 500) == (ChunkSpan(0, 1, 0, 5),)  # fits: the unchunked message
    cache = torch.zeros(2, 2, 4, 2, 4, 3)
    fabric_backend = Cluster(1, 1).fabric.endpoint(0)
    for endpoint in (KVSender, KVReceiver):
        with pytest.raises(ValueError, match="chunk_bytes must be positive, got 0"):
            endpoint(cache, 0, fabric_backend, chunk_bytes=0)


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(1, 1), (2, 1), (1, 2), (4, 2), (2, 4)])
def test_chunked_pulls_land_exactly(src_tp: int, dst_tp: int) -> None:
    num_pairs = max(src_tp, dst_tp)  # each carries num_kv_heads / num_pairs heads
    pair_block_bytes = SPEC.block_bytes(num_pairs)
    chunk_bytes = 2 * pair_block_bytes
    cluster = Cluster(src_tp, dst_tp, chunk_bytes=chunk_bytes)
    pulls = make_pulls([7, 1, 5, 3], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=20)
    headers = _record_headers(cluster)
    for pull in pulls:
        cluster.post(pull)
    for pull in pulls:
        cluster.send(pull)
    sent, received = cluster.poll()
    assert all(r.is_ok for r in sent + received) and len(received) == len(pulls) * dst_tp
    for result in received:
        num_blocks = cluster.descs[result.transfer_id].num_blocks
        assert result.num_bytes == num_blocks * SPEC.block_bytes(dst_tp)
    expected = num_pairs * sum(
        len(plan_chunks(len(p.src_block_ids), pair_block_bytes, chunk_bytes)) for p in pulls
    )
    assert len(headers) == expected > len(pulls) * num_pairs  # really chunked
    cluster.assert_landed(pulls)
    cluster.assert_quiet()


def test_chunks_go_out_in_seq_no_then_chunk_order_when_asked_c_a_b() -> None:
    cluster = Cluster(1, 1, chunk_bytes=TWO_BLOCKS)
    a, b, c = make_pulls([3, 5, 4], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=21)
    headers = _record_headers(cluster)
    for pull in (a, b, c):
        cluster.post(pull)
    sender = cluster.senders[0]
    cluster.send(c)
    cluster.send(a)
    assert sender.state("req-2") is TransferState.QUEUED
    cluster.send(b)
    assert sender.state("req-2") is TransferState.IN_FLIGHT
    assert [(h.seq_no, h.chunk_index, h.num_chunks) for _, h in headers] == [
        (0, 0, 2), (0, 1, 2),
        (1, 0, 3), (1, 1, 3), (1, 2, 3),
        (2, 0, 2), (2, 1, 2),
    ]  # fmt: skip
    _, received = cluster.poll()
    assert set(_states(received).values()) == {TransferState.DONE} and len(received) == 3
    cluster.assert_landed([a, b, c])
    cluster.assert_quiet()


def test_receiver_cancel_between_chunks_keeps_later_chunks_out() -> None:
    cluster = Cluster(1, 1, chunk_bytes=TWO_BLOCKS)
    a, b = make_pulls([7, 3], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=22)
    cluster.fabric.pause()
    cluster.post(a)
    cluster.post(b)
    cluster.send(a)
    cluster.send(b)
    cluster.fabric.deliver(0, 1, 2)  # a's first two chunks (blocks 0..2 of 7) arrive
    receiver = cluster.receivers[0]
    assert cluster.poll() == ([], []) and receiver.state("req-0") is TransferState.POSTED
    assert receiver.cancel("req-0")
    _, received = cluster.poll()
    assert _states(received) == {"req-0": TransferState.CANCELLED}
    cluster.fabric.resume()  # the rest of a is soaked up and dropped; b lands
    sent, received = cluster.poll()
    assert _states(sent) == {"req-0": TransferState.DONE, "req-1": TransferState.DONE}
    assert _states(received) == {"req-1": TransferState.DONE}
    first, second, *rest = _chunk_blocks(a, TWO_BLOCKS)
    written = Pull("req-0-head", a.src_block_ids[: len(first) + len(second)], first + second)
    cluster.assert_landed([written, b])  # a's later chunks never touched their blocks
    assert rest
    cluster.assert_quiet()


def test_sender_cancel_of_a_queued_transfer_sends_every_chunk_void() -> None:
    cluster = Cluster(1, 1, chunk_bytes=TWO_BLOCKS)
    a, b, c = make_pulls([2, 5, 3], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=23)
    headers = _record_headers(cluster)
    for pull in (a, b, c):
        cluster.post(pull)
    cluster.send(b)  # queued behind a
    assert cluster.senders[0].cancel("req-1")
    cluster.send(a)
    cluster.send(c)
    _, received = cluster.poll()
    assert _states(received) == {
        "req-0": TransferState.DONE,
        "req-1": TransferState.FAILED,
        "req-2": TransferState.DONE,
    }
    b_headers = [h for _, h in headers if h.tag == transfer_tag("req-1")]
    assert [(h.kind, h.chunk_index) for h in b_headers] == [(MessageKind.VOID, i) for i in range(3)]
    cluster.assert_landed([a, c])
    cluster.assert_quiet()


def test_void_send_fills_every_chunk_of_every_pair() -> None:
    cluster = Cluster(2, 1, chunk_bytes=TWO_BLOCKS)
    a, b = make_pulls([6, 3], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=24)
    headers = _record_headers(cluster)
    desc_a = cluster.post(a)
    cluster.post(b)
    for sender in cluster.senders:
        sender.start_void_send(desc_a, "lease expired")
    cluster.send(b)
    sent, received = cluster.poll()
    assert _states(received) == {"req-0": TransferState.FAILED, "req-1": TransferState.DONE}
    assert {r.state for r in sent if r.transfer_id == "req-0"} == {TransferState.CANCELLED}
    void = [h for _, h in headers if h.kind is MessageKind.VOID]
    pair_block_bytes = SPEC.block_bytes(2)  # each prefill rank sends half of the heads
    assert len(void) == 2 * len(plan_chunks(6, pair_block_bytes, TWO_BLOCKS)) == 4
    cluster.assert_landed([b])
    cluster.assert_quiet()


def test_wrong_chunk_index_is_refused_and_breaks_the_pair() -> None:
    cluster = Cluster(1, 1, chunk_bytes=TWO_BLOCKS)
    a, b = make_pulls([4, 2], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=25)
    cluster.post(a)
    chunk = torch.zeros(64 + TWO_BLOCKS, dtype=torch.uint8)  # the size of a's chunk 0
    header = MessageHeader(MessageKind.DATA, 0, transfer_tag("req-0"), 0, TWO_BLOCKS, 1, 2)
    write_header(chunk, header)
    cluster.fabric.endpoint(0).isend(chunk, 1)
    _, received = cluster.poll()
    assert _states(received) == {"req-0": TransferState.FAILED}
    assert "got chunk 1/2 of seq_no 0 where chunk 0/2 was posted" in (received[0].error or "")
    cluster.post(b)
    _, received = cluster.poll()
    assert "pair out of step" in (received[0].error or "")
    cluster.assert_landed([])


def test_ends_with_different_chunk_sizes_fail_without_writing() -> None:
    cluster = Cluster(1, 1, chunk_bytes=TWO_BLOCKS, recv_chunk_bytes=3 * BLOCK_BYTES)
    (a,) = make_pulls([6], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=26)
    cluster.post(a)
    cluster.send(a)
    sent, received = cluster.poll()
    assert [r.state for r in sent + received] == [TransferState.FAILED] * 2
    assert "size mismatch" in (received[0].error or "")
    cluster.assert_landed([])
