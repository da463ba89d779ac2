"""The project's own kernels (sources in ``csrc/``), each behind a PyTorch fallback.

Owns the Python side of the native kernels: finding and loading the built library, and choosing
per call between it and the pure-PyTorch implementation it must equal. Importing this package
loads nothing; a missing library only means the fallback runs.

- :mod:`distserve.kernels.kv_copy`: gather/scatter of a request's KV blocks
  (``csrc/kv_block_copy.cpp``; fallback :mod:`distserve.transfer.block_copy`).
"""

from __future__ import annotations

from distserve.kernels.kv_copy import available, gather_blocks, scatter_blocks

__all__ = ["available", "gather_blocks", "scatter_blocks"]
