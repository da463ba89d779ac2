"""The point-to-point interface KV transfer runs on, and the registry of its implementations.

Owns :class:`TransferBackend` (post a non-blocking send or receive of one flat byte buffer to or
from a peer rank), :class:`PendingOp` (poll it without blocking) and the name → class registry
used by configuration (``gloo``, ``nccl``, ``inprocess``; ``auto`` picks nccl for a CUDA cache
and gloo otherwise). It does not know about blocks, heads or transfers.

A backend matches messages between one pair of ranks in the order they were posted, and
carries no tags: that is NCCL's model, and the gloo backend keeps to it (one constant tag) so
that the ordering the sender enforces is what the gloo tests check.

A send may carry a ``before_post`` hook: the sender's "write the header, gather the chunk"
step. The backend runs it right before it posts the send, on the thread that posts it (gloo's
per-peer poster thread, or the caller), so the gather of a chunk happens just ahead of its write
to the wire and off the engine thread where a poster exists. If it raises, the send fails
without being posted.

A receive may carry an ``on_arrival`` hook: the receiver's "check the header, scatter the
chunk" step. The backend runs it once the bytes are in, and its op reports done only after the
hook returned, so a receiver that sees ``is_done()`` knows the hook's work is over. Where it runs
is the backend's choice: on the thread that learns of the completion (gloo's per-peer waiter
thread; the in-process fabric's delivering call) or inside the ``is_done()`` call that first
sees it complete (nccl, whose completion is a CUDA event that only polling discovers).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch


class TransferBackendError(RuntimeError):
    """A posted send or receive failed (peer gone, size mismatch, communicator error)."""


ArrivalHook = Callable[[], None]  # run once a receive's bytes are in; see the module docstring
PostHook = Callable[[], None]  # run right before a send is posted; see the module docstring


def run_hook(hook: Callable[[], None] | None, what: str) -> str | None:
    """Run an op's ``before_post``/``on_arrival`` hook; the op's error text if it raised."""
    if hook is None:
        return None
    try:
        hook()
    except Exception as err:  # any failure of the hook fails the op, visibly
        return f"{what}: preparing or handling the message failed: {err!r}"
    return None


class PendingOp(abc.ABC):
    """One posted ``isend`` or ``irecv``."""

    @abc.abstractmethod
    def is_done(self) -> bool:
        """True once the op has completed; never blocks. Raises TransferBackendError on failure."""


class TransferBackend(abc.ABC):
    """Non-blocking point-to-point transport between global ranks."""

    name: ClassVar[str]

    @abc.abstractmethod
    def wire_device(self, cache_device: torch.device) -> torch.device:
        """Where message buffers must live for a cache on ``cache_device``."""

    @abc.abstractmethod
    def isend(
        self,
        message: torch.Tensor,
        peer_rank: int,
        before_post: PostHook | None = None,
        may_post_inline: bool = False,
    ) -> PendingOp:
        """Post a send of the whole (contiguous, uint8) ``message`` to global rank ``peer_rank``.

        Sends to one peer are posted in the order of these calls. ``before_post`` runs once,
        right before the send is posted; if it raises, the op fails with its error.
        ``may_post_inline`` lets a backend with a poster thread prepare and post it on the
        calling thread instead, when that keeps the order (the sender's hint for a pair's only
        chunk, which then pays no thread hop)."""

    @abc.abstractmethod
    def irecv(
        self, message: torch.Tensor, peer_rank: int, on_arrival: ArrivalHook | None = None
    ) -> PendingOp:
        """Post a receive of exactly ``message.numel()`` bytes from ``peer_rank`` into it.

        ``on_arrival`` runs once the bytes are in and before the op reports done; if it raises,
        the op fails with its error."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release helper threads or handles; ops still posted are abandoned."""


_B = TypeVar("_B", bound=type[TransferBackend])
_BACKENDS: dict[str, type[TransferBackend]] = {}


def register_backend(cls: _B) -> _B:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _BACKENDS or cls.name == "auto":
        raise ValueError(f"transfer backend name {cls.name!r} is already taken")
    _BACKENDS[cls.name] = cls
    return cls


def _load_builtin_backends() -> None:
    # Imported here rather than at module top so that this module stays import-cycle free.
    from distserve.transfer import inprocess_backend, torch_backends  # noqa: F401


def backend_names() -> list[str]:
    _load_builtin_backends()
    return ["auto", *sorted(_BACKENDS)]


def resolve_backend_name(name: str, cache_device: torch.device) -> str:
    """``auto`` → ``nccl`` for a CUDA cache, ``gloo`` otherwise; other names pass through."""
    if name == "auto":
        return "nccl" if cache_device.type == "cuda" else "gloo"
    return name


def create_backend(name: str, cache_device: torch.device, **kwargs: Any) -> TransferBackend:
    """Build the backend called ``name`` (config's ``transfer.backend``) for a cache on a device."""
    _load_builtin_backends()
    resolved = resolve_backend_name(name, cache_device)
    factory: Callable[..., TransferBackend] | None = _BACKENDS.get(resolved)
    if factory is None:
        raise ValueError(f"unknown transfer backend {name!r}; expected one of {backend_names()}")
    return factory(**kwargs)
