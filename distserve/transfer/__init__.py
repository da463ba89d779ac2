"""KV-cache transfer from prefill ranks to decode ranks over torch.distributed point-to-point.

Owns the byte movement of a pull (gather → isend/irecv → scatter), its ordering and its
failure handling, on every rank of both instances. It does not own the control channel (the
instance's gRPC code carries :class:`TransferDescriptor` and the block ids), block allocation or
leases (the schedulers), nor the process group (the launcher).

A pull, as the rest of the engine drives it::

    decode driver                     decode ranks              prefill ranks          prefill driver
    allocate blocks, desc =
      TransferDescriptor(seq_no=SeqNoAllocator.next_seq_no(src_ranks), …)
      ── desc, block ids ─────────▶ post_recv(desc, ids)
    gRPC "send desc" ─────────────────────────────────────────────────────────────────▶ (lease valid?)
                                                            start_send(desc, ids) ◀── yes
                                                            start_void_send(desc) ◀── no
                                    ◀═══ one message per (prefill rank, decode rank) ═══
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
layout in ``wire.py``; which heads go where in ``plan.py``.
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
