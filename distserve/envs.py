"""Every environment variable distserve reads, in one place.

- ``DISTSERVE_CACHE_DIR``: where the demo model and logs of ``distserve serve`` live
  (default ``$XDG_CACHE_HOME/distserve`` or ``~/.cache/distserve``).
- ``DISTSERVE_HOST``: the address this node's instances advertise to the router (multi-node).
- ``DISTSERVE_KERNELS_LIB``: the native CPU kernel library to load instead of the checkout's
  ``csrc/build/libdistserve_kv.so`` (``distserve.kernels``).
- ``DISTSERVE_GRPC_KEEPALIVE_S``: how often gRPC channels ping their server while a call is
  open (default 30; ``distserve.rpc.options``).
- ``DISTSERVE_TIMELINE``: a folder; every process appends per-request timeline events there
  (``distserve.timeline``; off by default).
- ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``: set by torchrun.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("DISTSERVE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "distserve"


def advertise_host() -> str | None:
    return os.environ.get("DISTSERVE_HOST") or None


def kernels_lib() -> Path | None:
    """The native kernel library named by ``DISTSERVE_KERNELS_LIB``, or None when unset."""
    path = os.environ.get("DISTSERVE_KERNELS_LIB")
    return Path(path) if path else None


def grpc_keepalive_s() -> float:
    """Seconds between keepalive pings on an open gRPC call (``DISTSERVE_GRPC_KEEPALIVE_S``,
    default 30); a value that is not a positive number is an error."""
    raw = os.environ.get("DISTSERVE_GRPC_KEEPALIVE_S")
    if not raw:
        return 30.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(
            f"DISTSERVE_GRPC_KEEPALIVE_S must be a positive number of seconds, got {raw!r}"
        )
    return value


def timeline_dir() -> str | None:
    """The folder named by ``DISTSERVE_TIMELINE``, or None when unset."""
    return os.environ.get("DISTSERVE_TIMELINE") or None


def torchrun_env() -> dict[str, str]:
    """The torchrun variables that are set (callers check for the ones they need)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: os.environ[k] for k in keys if k in os.environ}
