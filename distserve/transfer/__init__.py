"""KV-cache transfer from prefill ranks to decode ranks over torch.distributed point-to-point.

Owns the byte movement of a pull (gather → isend/irecv → scatter, pipelined in chunks), its
ordering and its failure handling, on every rank of both instances. It does not own the control
channel (the instance's gRPC code carries :class:`TransferDescriptor` and the block ids), block
allocation or leases (the schedulers), nor the process group (the launcher).

A pull, as the rest of the engine drives it::

    decode driver                     decode ranks              prefill ranks          prefill driver
    allocate blocks, desc =
      TransferDescriptor(seq_no=SeqNoAllocator.next_seq_no(src_ranks), …)
      ── desc, block ids ─────────▶ post_recv(desc, ids)
    gRPC "send desc" ─────────────────────────────────────────────────────────────────▶ (lease valid?)
                                                            start_send(desc, ids) ◀── yes
                                                            start_void_send(desc) ◀── no
                                    ◀══ chunks of each (prefill rank, decode rank) pair ══
    each step: poll() on every rank; a transfer is over for an instance when all its
    ranks reported it. decode: DONE → request joins the batch; FAILED/CANCELLED → free
    the blocks, retry or fail the request. prefill: any result → drop the lease.

Each engine step, a rank's worker calls (never blocking, at most one call per new event):

- decode rank: ``receiver.post_recv(desc, block_ids)`` for new pulls (in ``seq_no`` order),
  ``receiver.cancel(transfer_id)`` for aborted requests, then ``receiver.poll()`` and forwards
  the :class:`TransferResult` list to its driver;
- prefill rank: ``sender.start_send(desc, block_ids)`` (or ``start_void_send``) for send
  requests, ``sender.cancel(transfer_id)`` for aborts, then ``sender.poll()`` likewise.

Blocks are freed only after the rank's ``poll()`` returned the transfer's result. Ordering, the
VOID message and cancellation are explained in ``sender.py`` and ``receiver.py``; the byte
layout in ``wire.py``; which heads go where in ``plan.py``; how a pair is cut into chunks in
``chunking.py``.

Pipelining and threads. Each pair's share of a transfer travels as several messages (chunks of
about ``chunk_bytes``, 4 MB by default; both ends must use the same value), strictly in
(``seq_no``, chunk) order, so that the copies at either end overlap the wire::

    prefill poster thread   gather c0, post c0 │ gather c1, post c1 │ gather c2, post c2 │ …
    gloo I/O threads                 wire c0   │        wire c1     │        wire c2     │ …
    decode waiter thread                       │     scatter c0     │     scatter c1     │ …

- prefill rank: ``start_send`` plans the chunks and hands them, in turn, to the backend; it
  copies nothing. Each chunk's gather is the send's ``before_post`` hook: with gloo the
  destination's poster thread gathers a chunk and posts it (the socket write follows while the
  chunk is still in cache), and gloo's I/O thread finishes a write while the next chunk is
  gathered; a pair's only chunk is gathered and posted inline, as before chunking. With nccl the gather
  is queued on the transfer stream inside ``isend``.
- decode rank: all chunk receives are posted by ``post_recv``. With gloo, the waiter thread for
  that prefill rank checks each chunk's header and scatters it as soon as it is in, while
  gloo's I/O thread fills the next chunk; with nccl that happens inside ``poll()`` on the
  transfer stream.
- ``cancel`` meets a gather or scatter in progress at one short lock, never held during a copy:
  no copy touches a transfer's blocks after ``cancel`` or its result (``send_fill.py``,
  ``recv_commit.py``). ``poll()`` never waits for a thread or the wire; with gloo it only reads
  flags and reports results.
"""

from __future__ import annotations

from distserve.transfer.backend import (
    PendingOp,
    TransferBackend,
    TransferBackendError,
    backend_names,
    create_backend,
    register_backend,
    resolve_backend_name,
)
from distserve.transfer.descriptor import (
    SeqNoAllocator,
    TransferDescriptor,
    TransferResult,
    TransferState,
)
from distserve.transfer.inprocess_backend import InProcessBackend, InProcessFabric
from distserve.transfer.plan import HeadSlice, plan_head_slices
from distserve.transfer.receiver import KVReceiver
from distserve.transfer.sender import KVSender

__all__ = [
    "HeadSlice",
    "InProcessBackend",
    "InProcessFabric",
    "KVReceiver",
    "KVSender",
    "PendingOp",
    "SeqNoAllocator",
    "TransferBackend",
    "TransferBackendError",
    "TransferDescriptor",
    "TransferResult",
    "TransferState",
    "backend_names",
    "create_backend",
    "plan_head_slices",
    "register_backend",
    "resolve_backend_name",
]
