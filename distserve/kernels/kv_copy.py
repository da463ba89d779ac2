"""Gather/scatter of a request's KV blocks by the native CPU kernel, else by the PyTorch copy.

Owns the ctypes binding of ``csrc/kv_block_copy.cpp`` and the choice of which copy runs. The
signatures and semantics are those of :mod:`distserve.transfer.block_copy` (the fallback, used
as is); where the transfer path calls which is the transfer owner's decision, not this module's.

Which copy runs, per call::

    library loaded? ──no──▶ PyTorch
        │yes
    cache, message and index on the CPU; cache and message dense and of one dtype; index 1-D
    int64; heads a non-empty slice of step 1; message shaped (L, 2, len(index), bs, heads, D)?
        │yes                              └──no──▶ PyTorch (which raises what torch raises)
    native, on torch.get_num_threads() OpenMP threads, without the GIL

The library is looked up at the first call or ``available()``, never at import: the file named
by ``DISTSERVE_KERNELS_LIB`` if set (see ``distserve.envs``), else ``csrc/build/libdistserve_kv.so``
of this checkout (``make -C csrc``). A missing library, one that fails to load or one of another
ABI version means the fallback (with a warning, unless the default one is simply not built).

Scatter's block ids must be distinct, as the transfer path's always are; with duplicates, which
bytes land is unspecified on either path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Any

import torch

from distserve import envs
from distserve.transfer import block_copy

logger = logging.getLogger(__name__)

_ABI_VERSION = 1  # DISTSERVE_KV_ABI_VERSION in csrc/kv_block_copy.h
_LIB_NAME = "libdistserve_kv.so"
_DEFAULT_LIB = Path(__file__).resolve().parents[2] / "csrc" / "build" / _LIB_NAME

# distserve_kv_status in csrc/kv_block_copy.h
_STATUS_OK = 0
_STATUS_BAD_BLOCK_ID = 3

# The fallbacks, as names of this module so that a test can tell which path ran.
_fallback_gather = block_copy.gather_blocks
_fallback_scatter = block_copy.scatter_blocks


class _KVLayout(ctypes.Structure):
    """``distserve_kv_layout``: the cache's shape and element size."""

    _fields_ = [
        ("elem_bytes", ctypes.c_int64),
        ("num_layers", ctypes.c_int64),
        ("num_blocks", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("num_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
    ]


# (cache, message, layout, block_ids, num_ids, head_start, head_end, num_threads)
_COPY_ARGTYPES: list[type[Any]] = [
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.POINTER(_KVLayout),
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int,
]


def _load(path: Path) -> ctypes.CDLL:
    """Opens the library and declares its functions; OSError/RuntimeError if it is not usable."""
    lib = ctypes.CDLL(str(path))  # CDLL calls release the GIL
    lib.distserve_kv_abi_version.argtypes = []
    lib.distserve_kv_abi_version.restype = ctypes.c_int
    version = lib.distserve_kv_abi_version()
    if version != _ABI_VERSION:
        raise RuntimeError(f"ABI version {version}, expected {_ABI_VERSION}; rebuild it")
    for fn in (lib.distserve_kv_gather, lib.distserve_kv_scatter):
        fn.argtypes = _COPY_ARGTYPES
        fn.restype = ctypes.c_int
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded library, or None; looked up once (tests clear the cache to look again)."""
    named = envs.kernels_lib()
    path = named if named is not None else _DEFAULT_LIB
    if named is None and not path.exists():
        logger.debug("no native KV copy library at %s; using the PyTorch copy", path)
        return None
    try:
        return _load(path)
    except (OSError, AttributeError, RuntimeError) as exc:
        logger.warning(
            "native KV copy library %s not usable (%s); using the PyTorch copy", path, exc
        )
        return None


def available() -> bool:
    """Whether the native library is loaded (it is then used for eligible CPU tensors)."""
    return _library() is not None


def _native_copy(
    fn_name: str, cache: torch.Tensor, index: torch.Tensor, heads: slice, message: torch.Tensor
) -> bool:
    """Runs the library's ``fn_name`` on these tensors; False when the fallback must run."""
    lib = _library()
    if lib is None or cache.dim() != 6:
        return False
    tensors = (cache, index, message)
    if any(t.device.type != "cpu" for t in tensors) or cache.dtype != message.dtype:
        return False
    if not (cache.is_contiguous() and message.is_contiguous()):
        return False
    if cache.requires_grad or message.requires_grad:  # let autograd see (and refuse) the copy
        return False
    if index.dtype != torch.int64 or index.dim() != 1 or heads.step not in (None, 1):
        return False
    num_layers, _, num_blocks, block_size, num_heads, head_dim = cache.shape
    head_start, head_end, _ = heads.indices(num_heads)
    if head_end <= head_start or num_blocks == 0:
        return False
    expected = (num_layers, 2, index.numel(), block_size, head_end - head_start, head_dim)
    if tuple(message.shape) != expected:
        return False
    index = index.contiguous()
    layout = _KVLayout(
        cache.element_size(), num_layers, num_blocks, block_size, num_heads, head_dim
    )
    status = getattr(lib, fn_name)(
        cache.data_ptr(),
        message.data_ptr(),
        ctypes.byref(layout),
        index.data_ptr(),
        index.numel(),
        head_start,
        head_end,
        torch.get_num_threads(),
    )
    if status == _STATUS_BAD_BLOCK_ID:
        raise IndexError(f"block id out of range for a cache of {num_blocks} blocks")
    assert status == _STATUS_OK, f"{fn_name} returned status {status} on checked arguments"
    return True


def gather_blocks(
    cache: torch.Tensor, index: torch.Tensor, heads: slice, out: torch.Tensor
) -> None:
    """``out[:, :, i] = cache[:, :, index[i], :, heads]``."""
    if not _native_copy("distserve_kv_gather", cache, index, heads, out):
        _fallback_gather(cache, index, heads, out)


def scatter_blocks(
    cache: torch.Tensor, index: torch.Tensor, heads: slice, src: torch.Tensor
) -> None:
    """``cache[:, :, index[i], :, heads] = src[:, :, i]``."""
    if not _native_copy("distserve_kv_scatter", cache, index, heads, src):
        _fallback_scatter(cache, index, heads, src)
