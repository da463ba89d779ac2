"""The torch.distributed backends: ``gloo`` (host buffers) and ``nccl`` (device buffers).

Owns only the thin mapping from :class:`TransferBackend` to ``dist.isend``/``dist.irecv`` on a
process group that spans both instances (the default world group unless one is given). Which
group exists, and its init, belong to the launcher.

- ``gloo`` moves host buffers. With a CUDA cache the sender gathers on the device and copies into
  a pinned host message, and the receiver copies back before scattering (see ``sender.py``).
- ``nccl`` moves device buffers directly. It has no tags, so ordering rests entirely on the
  sender issuing in ``seq_no`` order. NCCL cannot be run between two processes on a one-GPU
  machine, so this path shares every line above the two calls below with the gloo path that the
  tests run, and is itself untested here.

Both use one constant tag, so gloo matches messages of a pair first-posted-first-matched exactly
as NCCL does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from distserve.transfer.backend import (
    PendingOp,
    TransferBackend,
    TransferBackendError,
    register_backend,
)

_TAG = 0  # deliberately constant: see the module docstring


class _WorkOp(PendingOp):
    def __init__(self, work: Any, what: str) -> None:
        self._work = work
        self._what = what

    def is_done(self) -> bool:
        try:
            if not self._work.is_completed():
                return False
            self._work.wait()  # returns at once when completed; raises the op's error if any
        except Exception as err:  # the backends raise plain RuntimeError subclasses
            raise TransferBackendError(f"{self._what} failed: {err}") from err
        return True


class _TorchP2PBackend(TransferBackend):
    _needs: str  # backend name the process group must provide

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                f"the {self.name!r} transfer backend needs torch.distributed to be initialized "
                "(the launcher does this under torchrun)"
            )
        group_backend = str(dist.get_backend(group))
        if self._needs not in group_backend:
            raise RuntimeError(
                f"the {self.name!r} transfer backend needs a process group with {self._needs}, "
                f"got {group_backend!r}; init with backend='cpu:gloo,cuda:nccl' or pass "
                f"group=dist.new_group(backend={self._needs!r})"
            )
        self._group = group

    def isend(self, message: torch.Tensor, peer_rank: int) -> PendingOp:
        work = dist.isend(message, dst=peer_rank, group=self._group, tag=_TAG)
        return _WorkOp(work, f"{self.name} isend of {message.numel()} bytes to rank {peer_rank}")

    def irecv(self, message: torch.Tensor, peer_rank: int) -> PendingOp:
        work = dist.irecv(message, src=peer_rank, group=self._group, tag=_TAG)
        return _WorkOp(work, f"{self.name} irecv of {message.numel()} bytes from rank {peer_rank}")


@register_backend
class GlooBackend(_TorchP2PBackend):
    name = "gloo"
    _needs = "gloo"

    def wire_device(self, cache_device: torch.device) -> torch.device:
        return torch.device("cpu")


@register_backend
class NcclBackend(_TorchP2PBackend):
    name = "nccl"
    _needs = "nccl"

    def wire_device(self, cache_device: torch.device) -> torch.device:
        if cache_device.type != "cuda":
            raise ValueError(f"the nccl transfer backend needs a CUDA KV cache, got {cache_device}")
        return cache_device
