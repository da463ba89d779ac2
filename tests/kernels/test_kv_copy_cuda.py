"""The CUDA KV block copy (csrc/kv_block_copy.cu) equals the PyTorch copy on the GPU.

Marked ``gpu``: skipped without CUDA. Builds ``make -C csrc cuda`` and calls the launchers through
ctypes on the current stream. Nothing on the serving path loads the CUDA library yet; this test
is what a GPU machine runs to check it.
"""

from __future__ import annotations

import ctypes
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from distserve.kernels.kv_copy import _KVLayout
from distserve.transfer import block_copy

pytestmark = pytest.mark.gpu

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CUDA_SUCCESS = 0
# (num_layers, num_blocks, block_size, num_heads, head_dim): 16-byte words, then 2-byte ones
SHAPES = ((2, 32, 16, 8, 64), (3, 21, 4, 4, 3))


@pytest.fixture(scope="module")
def cuda_lib() -> ctypes.CDLL:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if shutil.which("make") is None or shutil.which("nvcc") is None:
        pytest.skip("needs make and nvcc to build csrc/ for CUDA")
    subprocess.run(["make", "-C", str(CSRC), "cuda"], check=True, capture_output=True, timeout=600)
    lib = ctypes.CDLL(str(CSRC / "build" / "libdistserve_kv_cuda.so"))
    for fn in (lib.distserve_kv_gather_cuda, lib.distserve_kv_scatter_cuda):
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.POINTER(_KVLayout),
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        fn.restype = ctypes.c_int
    return lib


def _launch(
    fn: Callable[..., int],
    cache: torch.Tensor,
    index: torch.Tensor,
    heads: slice,
    message: torch.Tensor,
    bad_id_count: torch.Tensor,
) -> None:
    num_layers, _, num_blocks, block_size, num_heads, head_dim = cache.shape
    layout = _KVLayout(
        cache.element_size(), num_layers, num_blocks, block_size, num_heads, head_dim
    )
    status = fn(
        cache.data_ptr(),
        message.data_ptr(),
        ctypes.byref(layout),
        index.data_ptr(),
        index.numel(),
        heads.start,
        heads.stop,
        bad_id_count.data_ptr(),
        torch.cuda.current_stream().cuda_stream,
    )
    assert status == CUDA_SUCCESS


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("heads_of", ("full", "partial", "single"))
def test_cuda_copy_equals_pytorch(
    cuda_lib: ctypes.CDLL, dtype: torch.dtype, shape: tuple[int, ...], heads_of: str
) -> None:
    num_layers, num_blocks, block_size, num_heads, head_dim = shape
    heads = {
        "full": slice(0, num_heads),
        "partial": slice(1, num_heads - 1),
        "single": slice(num_heads - 1, num_heads),
    }[heads_of]
    gen = torch.Generator().manual_seed(0)
    full_shape = (num_layers, 2, num_blocks, block_size, num_heads, head_dim)
    cache = torch.randn(full_shape, generator=gen).to("cuda", dtype)
    ids = random.Random(1).sample(range(num_blocks), num_blocks * 2 // 3)
    index = torch.tensor(ids, dtype=torch.int64, device="cuda")
    message_shape = (num_layers, 2, len(ids), block_size, heads.stop - heads.start, head_dim)
    bad_id_count = torch.zeros(1, dtype=torch.int32, device="cuda")

    expected = torch.empty(message_shape, dtype=dtype, device="cuda")
    block_copy.gather_blocks(cache, index, heads, expected)
    out = torch.full(message_shape, 7.0, dtype=dtype, device="cuda")
    _launch(cuda_lib.distserve_kv_gather_cuda, cache, index, heads, out, bad_id_count)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)

    src = torch.randn(message_shape, generator=gen).to("cuda", dtype)
    expected_cache = cache.clone()
    block_copy.scatter_blocks(expected_cache, index, heads, src)
    _launch(cuda_lib.distserve_kv_scatter_cuda, cache, index, heads, src, bad_id_count)
    torch.cuda.synchronize()
    assert torch.equal(cache, expected_cache)
    assert bad_id_count.item() == 0


def test_cuda_bad_block_id_is_counted_and_skipped(cuda_lib: ctypes.CDLL) -> None:
    cache = torch.zeros(2, 2, 8, 4, 2, 16, dtype=torch.float16, device="cuda")
    index = torch.tensor([1, 8, 3], dtype=torch.int64, device="cuda")
    src = torch.ones(2, 2, 3, 4, 2, 16, dtype=torch.float16, device="cuda")
    bad_id_count = torch.zeros(1, dtype=torch.int32, device="cuda")
    _launch(cuda_lib.distserve_kv_scatter_cuda, cache, index, slice(0, 2), src, bad_id_count)
    torch.cuda.synchronize()
    assert bad_id_count.item() == 2 * 2  # one per (layer, k/v) unit of the bad block
    assert torch.equal(cache[:, :, [1, 3]], src[:, :, [0, 2]])
    assert cache.sum().item() == 2 * 2 * 2 * 4 * 2 * 16
