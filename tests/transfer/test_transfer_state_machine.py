"""The sender/receiver state machines on the in-process backend: no torch.distributed world."""

from __future__ import annotations

import pytest
import torch

from distserve.engine.kv_spec import KVCacheSpec
from distserve.transfer import (
    InProcessFabric,
    KVSender,
    TransferDescriptor,
    TransferResult,
    TransferState,
    create_backend,
    resolve_backend_name,
)
from distserve.transfer.wire import MessageHeader, MessageKind, alloc_message, write_header
from tests.transfer.kv_inprocess_cluster import NUM_DST_BLOCKS, NUM_SRC_BLOCKS, SPEC, Cluster
from tests.transfer.kv_transfer_fixtures import Pull, descriptor, make_pulls


def _states(results: list[TransferResult]) -> dict[str, TransferState]:
    return {r.transfer_id: r.state for r in results}


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(1, 1), (2, 1), (1, 2), (4, 2), (2, 4)])
def test_pull_walks_posted_in_flight_done(src_tp: int, dst_tp: int) -> None:
    cluster = Cluster(src_tp, dst_tp)
    pulls = make_pulls([3, 1, 5], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=0)
    cluster.fabric.pause()
    for pull in pulls:
        cluster.post(pull)
    assert {r.state("req-0") for r in cluster.receivers} == {TransferState.POSTED}
    for pull in pulls:
        cluster.send(pull)
    assert {s.state("req-0") for s in cluster.senders} == {TransferState.IN_FLIGHT}
    assert cluster.poll() == ([], [])
    cluster.fabric.resume()
    sent, received = cluster.poll()
    assert len(sent) == 3 * src_tp and len(received) == 3 * dst_tp
    assert all(r.is_ok and r.error is None for r in sent + received)
    block_bytes = SPEC.block_bytes(dst_tp)
    for result in received:
        assert result.num_bytes == cluster.descs[result.transfer_id].num_blocks * block_bytes
    assert sum(r.num_bytes for r in sent) == sum(r.num_bytes for r in received)
    cluster.assert_landed(pulls)
    assert all(
        e.num_active == 0 and e.num_orphans == 0 for e in (*cluster.senders, *cluster.receivers)
    )


def test_replica_with_nothing_to_send_reports_done_at_once() -> None:
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, block_size=2, dtype="float16")
    cluster = Cluster(2, 1, spec=spec)
    (pull,) = make_pulls([4], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=3)
    cluster.post(pull)
    cluster.send(pull)
    sent, received = cluster.poll()
    assert [(r.state, r.num_bytes > 0) for r in sent] == [
        (TransferState.DONE, True),
        (TransferState.DONE, False),
    ]
    assert _states(received) == {"req-0": TransferState.DONE}
    assert cluster.fabric.sent_log == [(0, 2, cluster.fabric.sent_log[0][2])]  # only rank 0 sent
    cluster.assert_landed([pull])
    cluster.assert_quiet()


def test_sends_requested_out_of_order_are_issued_in_posted_order() -> None:
    cluster = Cluster(1, 1)
    a, b, c = make_pulls([2, 3, 4], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=4)
    for pull in (a, b, c):
        cluster.post(pull)
    sender = cluster.senders[0]
    cluster.send(c)
    assert sender.state("req-2") is TransferState.QUEUED and cluster.fabric.sent_log == []
    cluster.send(a)
    assert sender.state("req-2") is TransferState.QUEUED
    cluster.send(b)
    assert sender.state("req-2") is TransferState.IN_FLIGHT
    sizes = [n for _, _, n in cluster.fabric.sent_log]
    assert sizes == sorted(sizes)  # a (2 blocks), b (3), c (4): posted order
    _, received = cluster.poll()
    assert set(_states(received).values()) == {TransferState.DONE} and len(received) == 3
    cluster.assert_landed([a, b, c])
    cluster.assert_quiet()


def test_receives_must_be_posted_in_seq_no_order_and_sends_not_repeated() -> None:
    cluster = Cluster(1, 1)
    a, b = make_pulls([2, 2], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=5)
    late = descriptor(SPEC, b, 1, cluster.src_ranks, cluster.dst_ranks)
    with pytest.raises(ValueError, match="must be posted in seq_no order: expected 0, got 1"):
        cluster.receivers[0].post_recv(late, b.dst_block_ids)
    cluster.post(a)
    with pytest.raises(ValueError, match="already posted"):
        cluster.receivers[0].post_recv(cluster.descs["req-0"], a.dst_block_ids)
    cluster.send(a)
    cluster.poll()
    again = descriptor(
        SPEC,
        Pull("req-0-again", a.src_block_ids, a.dst_block_ids),
        0,
        cluster.src_ranks,
        cluster.dst_ranks,
    )
    with pytest.raises(ValueError, match="seq_no 0 to rank 1 was already sent or queued"):
        cluster.senders[0].start_send(again, a.src_block_ids)


def test_cancel_after_post_never_writes_the_blocks_and_the_pair_keeps_working() -> None:
    cluster = Cluster(2, 2)
    a, b, c = make_pulls([3, 2, 4], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=6)
    cluster.post(a)
    cluster.post(b)
    assert all(r.cancel("req-0") for r in cluster.receivers)
    assert not cluster.receivers[0].cancel("req-0")  # already ended
    _, received = cluster.poll()
    assert _states(received) == {"req-0": TransferState.CANCELLED}  # blocks may be freed now
    assert all(r.num_orphans == 1 for r in cluster.receivers)  # the irecv stays posted
    cluster.send(a)  # the prefill side did not hear of the cancel in time
    cluster.send(b)
    sent, received = cluster.poll()
    assert set(_states(sent).values()) == {TransferState.DONE}
    assert [r.transfer_id for r in received] == ["req-1", "req-1"] and all(
        r.is_ok for r in received
    )
    assert all(r.num_orphans == 0 for r in cluster.receivers)
    cluster.post(c)
    cluster.send(c)
    cluster.poll()
    cluster.assert_landed([b, c])  # a's blocks untouched
    cluster.assert_quiet()


def test_cancel_before_the_send_is_issued_turns_it_void() -> None:
    cluster = Cluster(1, 1)
    a, b, c = make_pulls([2, 2, 2], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=7)
    for pull in (a, b, c):
        cluster.post(pull)
    cluster.send(b)  # queued behind a
    assert cluster.senders[0].cancel("req-1")
    sent, _ = cluster.poll()
    assert _states(sent) == {"req-1": TransferState.CANCELLED}  # source blocks free to go
    cluster.send(a)
    cluster.send(c)
    sent, received = cluster.poll()
    assert _states(received) == {
        "req-0": TransferState.DONE,
        "req-1": TransferState.FAILED,
        "req-2": TransferState.DONE,
    }
    failed = next(r for r in received if r.transfer_id == "req-1")
    assert "sent no KV" in (failed.error or "") and failed.num_bytes == 0
    cluster.assert_landed([a, c])
    cluster.assert_quiet()


def test_void_send_when_the_lease_expired() -> None:
    cluster = Cluster(2, 1)
    a, b = make_pulls([3, 3], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=8)
    desc_a = cluster.post(a)
    cluster.post(b)
    for sender in cluster.senders:
        sender.start_void_send(desc_a, "lease expired")
    cluster.send(b)
    sent, received = cluster.poll()
    assert [(r.transfer_id, r.state, r.error) for r in sent if r.transfer_id == "req-0"] == [
        ("req-0", TransferState.CANCELLED, "void send: lease expired")
    ] * 2
    assert _states(received) == {"req-0": TransferState.FAILED, "req-1": TransferState.DONE}
    cluster.assert_landed([b])
    cluster.assert_quiet()


def test_receive_timeout_then_the_late_message_is_soaked_up() -> None:
    cluster = Cluster(1, 1, recv_timeout_s=5.0)
    a, b = make_pulls([2, 3], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=9)
    cluster.post(a)
    cluster.clock.now_s = 5.5
    _, received = cluster.poll()
    assert _states(received) == {"req-0": TransferState.FAILED}
    assert "timed out after 5.0 s waiting for prefill ranks [0]" in (received[0].error or "")
    cluster.post(b)
    cluster.send(a)  # late, but still in its turn
    cluster.send(b)
    _, received = cluster.poll()
    assert _states(received) == {"req-1": TransferState.DONE}
    cluster.assert_landed([b])
    cluster.assert_quiet()


def test_send_timeout_while_waiting_for_a_predecessor() -> None:
    cluster = Cluster(1, 1, send_timeout_s=5.0, recv_timeout_s=60.0)
    a, b = make_pulls([2, 2], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=10)
    cluster.post(a)
    cluster.post(b)
    cluster.send(b)
    cluster.clock.now_s = 6.0
    sent, _ = cluster.poll()
    assert _states(sent) == {"req-1": TransferState.FAILED}
    assert "still waits for earlier seq_nos to ranks [1]" in (sent[0].error or "")
    cluster.send(a)  # b goes out VOID right behind it
    sent, received = cluster.poll()
    assert _states(sent) == {"req-0": TransferState.DONE}
    assert _states(received) == {"req-0": TransferState.DONE, "req-1": TransferState.FAILED}
    cluster.assert_landed([a])
    cluster.assert_quiet()


def test_backend_failure_is_an_explicit_error_on_both_sides() -> None:
    cluster = Cluster(1, 1)
    (a,) = make_pulls([2], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=11)
    cluster.fabric.pause()
    cluster.post(a)
    cluster.send(a)
    cluster.fabric.fail_pair(0, 1, "peer died")
    sent, received = cluster.poll()
    assert [(r.state, r.error) for r in sent + received] == [
        (TransferState.FAILED, "peer died")
    ] * 2
    cluster.assert_landed([])
    cluster.assert_quiet()


def test_out_of_step_message_is_refused_and_breaks_the_pair() -> None:
    cluster = Cluster(1, 1)
    a, b = make_pulls([2, 2], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=12)
    cluster.post(a)
    rogue = alloc_message(SPEC, 2, 4, torch.device("cpu"), is_pinned=False)
    write_header(rogue, MessageHeader(MessageKind.DATA, 7, 0, 0, rogue.numel() - 64))
    cluster.fabric.endpoint(0).isend(rogue, 1)
    _, received = cluster.poll()
    assert _states(received) == {"req-0": TransferState.FAILED}
    assert "out of order: got seq_no 7 where 0" in (received[0].error or "")
    cluster.post(b)
    _, received = cluster.poll()
    assert _states(received) == {"req-1": TransferState.FAILED}
    assert "pair out of step" in (received[0].error or "")
    cluster.assert_landed([])


def test_bad_arguments_are_clear_errors() -> None:
    cluster = Cluster(2, 1)
    (a,) = make_pulls([3], NUM_SRC_BLOCKS, NUM_DST_BLOCKS, seed=13)
    desc = descriptor(SPEC, a, 0, cluster.src_ranks, cluster.dst_ranks)
    receiver, sender = cluster.receivers[0], cluster.senders[0]
    with pytest.raises(ValueError, match="expected 3 block ids, got 2"):
        receiver.post_recv(desc, a.dst_block_ids[:2])
    with pytest.raises(ValueError, match="must be distinct"):
        receiver.post_recv(desc, [1, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        sender.start_send(desc, [0, 1, NUM_SRC_BLOCKS])
    with pytest.raises(ValueError, match="rank 2 is not one of the prefill ranks"):
        KVSender(cluster.dst_cache(0), 2, cluster.fabric.endpoint(2)).start_send(
            desc, a.src_block_ids
        )
    wrong_tp = descriptor(SPEC, a, 0, (0,), (2,))
    with pytest.raises(ValueError, match="does not match the transfer's layout"):
        sender.start_send(wrong_tp, a.src_block_ids)
    assert receiver.num_active == 0 and sender.num_active == 0


def test_descriptor_round_trip_and_validation() -> None:
    desc = TransferDescriptor("x", 3, 5, (0, 1), (2,), SPEC)
    assert TransferDescriptor.from_dict(desc.to_dict()) == desc
    assert (desc.src_tp, desc.dst_tp) == (2, 1)
    with pytest.raises(ValueError, match="name distinct ranks"):
        TransferDescriptor("x", 0, 5, (0, 1), (1,), SPEC)
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        TransferDescriptor("x", 0, 0, (0,), (1,), SPEC)
    with pytest.raises(ValueError, match="decode instance \\(TP=3\\)"):
        TransferDescriptor("x", 0, 1, (0,), (1, 2, 3), SPEC)


def test_backend_registry() -> None:
    assert resolve_backend_name("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend_name("auto", torch.device("cuda", 0)) == "nccl"
    fabric = InProcessFabric()
    assert (
        create_backend("inprocess", torch.device("cpu"), fabric=fabric, rank=0).name == "inprocess"
    )
    with pytest.raises(
        ValueError,
        match="unknown transfer backend 'mpi'; expected one of \\['auto', 'gloo', 'inprocess', 'nccl'\\]",
    ):
        create_backend("mpi", torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"needs torch\.distributed to be initialized"):
        create_backend("auto", torch.device("cpu"))
