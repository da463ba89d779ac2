"""An in-process prefill instance and decode instance: every rank's sender/receiver in one process.

The ranks talk over an :class:`InProcessFabric`, with a fake clock, so a test drives delivery,
time and every engine step itself and can check exactly which blocks changed.
"""

from __future__ import annotations

import torch

from distserve.engine.kv_spec import KVCacheSpec
from distserve.transfer import (
    InProcessFabric,
    KVReceiver,
    KVSender,
    SeqNoAllocator,
    TransferDescriptor,
    TransferResult,
)
from distserve.transfer.chunking import DEFAULT_CHUNK_BYTES
from tests.transfer.kv_transfer_fixtures import (
    Pull,
    descriptor,
    expected_dst_cache,
    model_cache,
    rank_cache,
)

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=3, block_size=2, dtype="float32")
NUM_SRC_BLOCKS, NUM_DST_BLOCKS = 16, 20


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class Cluster:
    """A prefill instance (global ranks 0..src_tp-1) and a decode instance after it, in one process."""

    def __init__(
        self,
        src_tp: int,
        dst_tp: int,
        spec: KVCacheSpec = SPEC,
        send_timeout_s: float = 10.0,
        recv_timeout_s: float = 10.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        recv_chunk_bytes: int | None = None,  # None: the same as the senders'
    ) -> None:
        self.spec = spec
        self.fabric = InProcessFabric()
        self.clock = FakeClock()
        self.src_ranks = tuple(range(src_tp))
        self.dst_ranks = tuple(range(src_tp, src_tp + dst_tp))
        self.full_src = model_cache(spec, NUM_SRC_BLOCKS, seed=1)
        self.full_dst = model_cache(spec, NUM_DST_BLOCKS, seed=2)
        self.senders = [
            KVSender(
                rank_cache(self.full_src, spec, r, src_tp),
                g,
                self.fabric.endpoint(g),
                timeout_s=send_timeout_s,
                chunk_bytes=chunk_bytes,
                clock=self.clock,
            )
            for r, g in enumerate(self.src_ranks)
        ]
        self.initial_dst = [rank_cache(self.full_dst, spec, r, dst_tp) for r in range(dst_tp)]
        self.receivers = [
            KVReceiver(
                cache.clone(),
                g,
                self.fabric.endpoint(g),
                timeout_s=recv_timeout_s,
                chunk_bytes=chunk_bytes if recv_chunk_bytes is None else recv_chunk_bytes,
                clock=self.clock,
            )
            for cache, g in zip(self.initial_dst, self.dst_ranks)
        ]
        self.seq_nos = SeqNoAllocator()
        self.descs: dict[str, TransferDescriptor] = {}

    def post(self, pull: Pull) -> TransferDescriptor:
        desc = descriptor(
            self.spec,
            pull,
            self.seq_nos.next_seq_no(self.src_ranks),
            self.src_ranks,
            self.dst_ranks,
        )
        self.descs[pull.transfer_id] = desc
        for receiver in self.receivers:
            receiver.post_recv(desc, pull.dst_block_ids)
        return desc

    def send(self, pull: Pull) -> None:
        for sender in self.senders:
            sender.start_send(self.descs[pull.transfer_id], pull.src_block_ids)

    def poll(self) -> tuple[list[TransferResult], list[TransferResult]]:
        """(every sender's results, every receiver's results) of one engine step."""
        sent = [r for s in self.senders for r in s.poll()]
        received = [r for r in self.receivers for r in r.poll()]
        for endpoint in (*self.senders, *self.receivers):
            endpoint.check_consistency()
        return sent, received

    def assert_quiet(self) -> None:
        """Nothing pending anywhere, and every message buffer is back in its pool."""
        for endpoint in (*self.senders, *self.receivers):
            assert (endpoint.num_active, endpoint.num_orphans, endpoint.num_buffers_in_use) == (
                0,
                0,
                0,
            )

    def dst_cache(self, dst_tp_rank: int) -> torch.Tensor:
        return self.receivers[dst_tp_rank]._cache

    def assert_landed(self, pulls: list[Pull]) -> None:
        """Exactly ``pulls`` landed on every decode rank; every other block is as it was."""
        for r, initial in enumerate(self.initial_dst):
            expected = expected_dst_cache(
                initial, self.full_src, self.spec, pulls, r, len(self.dst_ranks)
            )
            assert torch.equal(self.dst_cache(r), expected)
