"""The native KV block copy (csrc/kv_block_copy.cpp) equals the PyTorch copy byte for byte.

The library is built into this checkout with ``make -C csrc`` (a no-op when CI's
``make -C csrc check`` has built it); the native tests skip only when g++ or make is missing.
The reference is :mod:`distserve.transfer.block_copy`, called directly.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from distserve.kernels import kv_copy
from distserve.transfer import block_copy

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (num_layers, num_blocks, block_size, num_heads, head_dim)
SHAPES = (
    (1, 8, 1, 1, 8),
    (2, 16, 4, 4, 16),
    (3, 21, 16, 8, 3),  # 3-element heads: rows that are not whole 8-byte words
    (4, 48, 16, 8, 64),  # messages of 2-8 MB but a single head: copied by an OpenMP team
)
HEADS = ("full", "partial", "single")


def _head_slice(kind: str, num_heads: int) -> slice:
    if kind == "full":
        return slice(0, num_heads)
    if kind == "partial":
        return slice(num_heads // 4, max(num_heads // 4 + 1, num_heads * 3 // 4))
    return slice(num_heads - 1, num_heads)


def _cache(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    num_layers, num_blocks, block_size, num_heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    full = (num_layers, 2, num_blocks, block_size, num_heads, head_dim)
    return torch.randn(full, generator=gen, dtype=torch.float32).to(dtype)


def _message(cache: torch.Tensor, num_ids: int, heads: slice, seed: int) -> torch.Tensor:
    num_layers, _, _, block_size, num_heads, head_dim = cache.shape
    num_heads_sent = len(range(*heads.indices(num_heads)))
    gen = torch.Generator().manual_seed(seed)
    shape = (num_layers, 2, num_ids, block_size, num_heads_sent, head_dim)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(cache.dtype)


def _shuffled_ids(num_blocks: int, seed: int) -> torch.Tensor:
    """About two thirds of the blocks, distinct, in a shuffled non-contiguous order."""
    ids = random.Random(seed).sample(range(num_blocks), max(1, num_blocks * 2 // 3))
    return torch.tensor(ids, dtype=torch.int64)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.view(torch.uint8))


def _native_only(*_args: object) -> None:
    raise AssertionError("the PyTorch fallback ran where the native copy should have")


def _use_library(monkeypatch: pytest.MonkeyPatch, path: Path | None) -> None:
    """Points kv_copy at ``path`` (None: the checkout's default) and drops the loaded one."""
    if path is None:
        monkeypatch.delenv("DISTSERVE_KERNELS_LIB", raising=False)
    else:
        monkeypatch.setenv("DISTSERVE_KERNELS_LIB", str(path))
    kv_copy._library.cache_clear()


@pytest.fixture(scope="module")
def built_library() -> Path:
    if shutil.which("make") is None or shutil.which("g++") is None:
        pytest.skip("needs make and g++ to build csrc/")
    subprocess.run(["make", "-C", str(CSRC)], check=True, capture_output=True, timeout=300)
    lib = CSRC / "build" / "libdistserve_kv.so"
    assert lib.is_file()
    return lib


@pytest.fixture
def native(built_library: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The checkout's library is loaded, and calling the fallback fails the test."""
    _use_library(monkeypatch, None)
    assert kv_copy.available()
    monkeypatch.setattr(kv_copy, "_fallback_gather", _native_only)
    monkeypatch.setattr(kv_copy, "_fallback_scatter", _native_only)
    yield
    kv_copy._library.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("head_kind", HEADS)
def test_gather_equals_pytorch(
    native: None, dtype: torch.dtype, shape: tuple[int, ...], head_kind: str
) -> None:
    cache = _cache(shape, dtype, seed=1)
    before = cache.clone()
    index = _shuffled_ids(cache.shape[2], seed=2)
    heads = _head_slice(head_kind, cache.shape[4])
    expected = _message(cache, len(index), heads, seed=3)
    out = torch.full_like(expected, 7.0)
    block_copy.gather_blocks(cache, index, heads, expected)

    kv_copy.gather_blocks(cache, index, heads, out)

    assert _same_bytes(out, expected)
    assert _same_bytes(cache, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("head_kind", HEADS)
def test_scatter_equals_pytorch_and_touches_nothing_else(
    native: None, dtype: torch.dtype, shape: tuple[int, ...], head_kind: str
) -> None:
    cache = _cache(shape, dtype, seed=4)
    before = cache.clone()
    index = _shuffled_ids(cache.shape[2], seed=5)
    heads = _head_slice(head_kind, cache.shape[4])
    src = _message(cache, len(index), heads, seed=6)
    expected = cache.clone()
    block_copy.scatter_blocks(expected, index, heads, src)

    kv_copy.scatter_blocks(cache, index, heads, src)

    assert _same_bytes(cache, expected)
    written = torch.zeros(cache.shape, dtype=torch.bool)
    written[:, :, index, :, heads] = True
    assert torch.equal(cache[:, :, index, :, heads], src)
    assert _same_bytes(cache[~written], before[~written])


def test_index_of_any_layout_and_empty_index(native: None) -> None:
    cache = _cache((2, 16, 4, 4, 16), torch.bfloat16, seed=7)
    wide = torch.tensor([3, -1, 9, -1, 0, -1, 12], dtype=torch.int64)
    strided = wide[::2]  # a non-contiguous index: [3, 9, 0, 12]
    out = torch.empty(2, 2, 4, 4, 2, 16, dtype=torch.bfloat16)
    kv_copy.gather_blocks(cache, strided, slice(1, 3), out)
    assert torch.equal(out, cache[:, :, [3, 9, 0, 12], :, 1:3])

    before = cache.clone()
    empty = torch.empty(2, 2, 0, 4, 4, 16, dtype=torch.bfloat16)
    kv_copy.gather_blocks(cache, torch.empty(0, dtype=torch.int64), slice(0, 4), empty)
    kv_copy.scatter_blocks(cache, torch.empty(0, dtype=torch.int64), slice(0, 4), empty)
    assert torch.equal(cache, before)


@pytest.mark.parametrize("bad_id", [16, -1])
def test_out_of_range_block_id_raises_and_copies_nothing(native: None, bad_id: int) -> None:
    cache = _cache((2, 16, 4, 4, 16), torch.float16, seed=8)
    before = cache.clone()
    index = torch.tensor([2, bad_id, 5], dtype=torch.int64)
    message = _message(cache, 3, slice(0, 4), seed=9)
    with pytest.raises(IndexError):
        kv_copy.scatter_blocks(cache, index, slice(0, 4), message)
    assert torch.equal(cache, before)
    untouched = message.clone()
    with pytest.raises(IndexError):
        kv_copy.gather_blocks(cache, index, slice(0, 4), message)
    assert torch.equal(message, untouched)


def test_ineligible_tensors_fall_back(built_library: Path, monkeypatch) -> None:
    """A strided message or an int32 index takes the PyTorch path, with the same result."""
    _use_library(monkeypatch, None)
    assert kv_copy.available()
    fallback_calls: list[str] = []

    def spy(*args: object) -> None:
        fallback_calls.append("gather")
        block_copy.gather_blocks(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(kv_copy, "_fallback_gather", spy)
    cache = _cache((2, 16, 4, 4, 16), torch.float32, seed=10)
    index = _shuffled_ids(16, seed=11)
    strided_out = torch.empty(2, 2, len(index), 4, 4, 32)[..., ::2]
    kv_copy.gather_blocks(cache, index, slice(0, 4), strided_out)
    assert torch.equal(strided_out, cache[:, :, index])
    out = torch.empty(2, 2, len(index), 4, 2, 16)
    kv_copy.gather_blocks(cache, index.to(torch.int32), slice(2, 4), out)
    assert torch.equal(out, cache[:, :, index, :, 2:4])
    assert fallback_calls == ["gather", "gather"]
    kv_copy._library.cache_clear()


def test_fallback_when_library_is_absent(tmp_path: Path, monkeypatch) -> None:
    _use_library(monkeypatch, tmp_path / "missing" / "libdistserve_kv.so")
    assert not kv_copy.available()
    cache = _cache((2, 16, 4, 4, 16), torch.bfloat16, seed=12)
    index = _shuffled_ids(16, seed=13)
    heads = slice(1, 3)
    out, expected = (_message(cache, len(index), heads, seed=14) for _ in range(2))
    block_copy.gather_blocks(cache, index, heads, expected)
    kv_copy.gather_blocks(cache, index, heads, out)
    assert _same_bytes(out, expected)

    src = _message(cache, len(index), heads, seed=15)
    expected_cache = cache.clone()
    block_copy.scatter_blocks(expected_cache, index, heads, src)
    kv_copy.scatter_blocks(cache, index, heads, src)
    assert _same_bytes(cache, expected_cache)
    kv_copy._library.cache_clear()


def test_unloadable_library_falls_back(tmp_path: Path, monkeypatch) -> None:
    not_a_library = tmp_path / "libdistserve_kv.so"
    not_a_library.write_bytes(b"not an ELF file")
    _use_library(monkeypatch, not_a_library)
    assert not kv_copy.available()
    kv_copy._library.cache_clear()


def test_import_never_loads_the_library(tmp_path: Path) -> None:
    """A fresh interpreter imports the package with the library absent, then falls back."""
    code = (
        "import torch, distserve.kernels as k\n"
        "from distserve.kernels import kv_copy\n"
        "assert kv_copy._library.cache_info().currsize == 0\n"
        "c = torch.arange(2 * 2 * 3 * 1 * 1 * 2, dtype=torch.float32).view(2, 2, 3, 1, 1, 2)\n"
        "o = torch.empty(2, 2, 1, 1, 1, 2)\n"
        "k.gather_blocks(c, torch.tensor([2]), slice(0, 1), o)\n"
        "assert torch.equal(o, c[:, :, 2:3]) and not k.available()\n"
    )
    env = {**os.environ, "DISTSERVE_KERNELS_LIB": str(tmp_path / "absent.so")}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env, cwd=REPO)
