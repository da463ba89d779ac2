"""Native (csrc/kv_block_copy.cpp) vs PyTorch (transfer/block_copy.py) KV block gather/scatter.

One process, CPU. For each message size, a request's blocks are spread over a cache shaped like
one rank's of a small GQA model (block ids shuffled, non-contiguous), and each of the four
copies (native/PyTorch × gather/scatter) runs ``reps`` times, interleaved so that a change of
machine load hits all four alike; the first run of each is a warm-up. Two head selections: all
heads (TP 1 → 1: one memcpy per block) and half of them (a decode rank of twice the TP: one
memcpy per token). Reports the median time, bandwidth (message bytes / time) and
PyTorch/native (> 1: native is faster), prints a table and writes JSON.

Needs the library: ``make -C csrc``. Both copies use ``torch.get_num_threads()`` threads. On a
machine whose cores are busy with other work, any parallel copy (native or PyTorch) can wait a
whole scheduler time slice for a thread the OS has not run yet, and that wait, not the copy, is
what gets measured; ``--threads 1`` compares the copies themselves there.

    python benchmarks/kv_copy.py [--quick] [--reps N] [--threads N] [--out results/kv_copy.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distserve.engine.kv_spec import KVCacheSpec
from distserve.kernels import kv_copy
from distserve.transfer import block_copy

# One rank of a small GQA model: 16 layers, 4 local KV heads of 64, 16-token blocks, bf16.
SPEC = KVCacheSpec(num_layers=16, num_kv_heads=4, head_dim=64, block_size=16, dtype="bfloat16")
SIZES_MB = (1, 4, 16, 64, 256)
QUICK_SIZES_MB = (1, 16, 64)
HEAD_SLICES = {"all": slice(0, 4), "half": slice(2, 4)}
MB = 1 << 20

CopyFn = Callable[[torch.Tensor, torch.Tensor, slice, torch.Tensor], None]
METHODS: dict[str, CopyFn] = {
    "native_gather": kv_copy.gather_blocks,
    "torch_gather": block_copy.gather_blocks,
    "native_scatter": kv_copy.scatter_blocks,
    "torch_scatter": block_copy.scatter_blocks,
}


def _measure(size_mb: int, head_kind: str, reps: int) -> dict[str, Any]:
    heads = HEAD_SLICES[head_kind]
    num_heads_sent = heads.stop - heads.start
    message_block_bytes = SPEC.block_bytes() * num_heads_sent // SPEC.num_kv_heads
    num_ids = max(1, size_mb * MB // message_block_bytes)
    cache_blocks = num_ids * 3 // 2 + 8
    shape = (SPEC.num_layers, 2, cache_blocks, SPEC.block_size, SPEC.num_kv_heads, SPEC.head_dim)
    gen = torch.Generator().manual_seed(size_mb)
    cache = torch.randn(shape, generator=gen, dtype=torch.bfloat16)
    index = torch.tensor(random.Random(size_mb).sample(range(cache_blocks), num_ids))
    message_shape = (*shape[:2], num_ids, SPEC.block_size, num_heads_sent, SPEC.head_dim)
    messages = {name: torch.zeros(message_shape, dtype=torch.bfloat16) for name in METHODS}

    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for rep in range(reps + 1):  # the first of each is a warm-up
        for name, copy in METHODS.items():
            start_s = time.perf_counter()
            copy(cache, index, heads, messages[name])  # scatters write back what was gathered
            if rep:
                times[name].append(time.perf_counter() - start_s)
    assert torch.equal(messages["native_gather"], messages["torch_gather"])
    assert torch.equal(messages["native_gather"], cache[:, :, index, :, heads])

    message_bytes = messages["native_gather"].numel() * 2
    median_s = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "heads": head_kind,
        "size_mb": message_bytes / MB,
        "num_blocks": num_ids,
        "message_bytes": message_bytes,
        **{f"{name}_median_s": s for name, s in median_s.items()},
        **{f"{name}_gb_per_s": message_bytes / s / 1e9 for name, s in median_s.items()},
        "gather_torch_over_native": median_s["torch_gather"] / median_s["native_gather"],
        "scatter_torch_over_native": median_s["torch_scatter"] / median_s["native_scatter"],
        **{f"{name}_all_s": ts for name, ts in times.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/kv_copy.json", help="JSON result file")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions per size (default 9; 3 with --quick)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if not kv_copy.available():
        sys.exit("the native library is not built or not loadable: run `make -C csrc` first")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes_mb = list(QUICK_SIZES_MB if args.quick else SIZES_MB)
    reps = args.reps or (3 if args.quick else 9)

    load_before = os.getloadavg()
    rows = [_measure(size, kind, reps) for kind in HEAD_SLICES for size in sizes_mb]
    load_after = os.getloadavg()

    print(
        f"KV block copy, native vs PyTorch, on {platform.node()} ({os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads, load {load_before[0]:.1f} -> {load_after[0]:.1f}), "
        f"{reps} reps, median"
    )
    print(
        f"{'op':<8} {'heads':<5} {'MB':>6} {'blocks':>6} {'native ms':>10} {'torch ms':>10} "
        f"{'native GB/s':>12} {'torch GB/s':>11} {'torch/native':>13}"
    )
    for op in ("gather", "scatter"):
        for row in rows:
            print(
                f"{op:<8} {row['heads']:<5} {row['size_mb']:6.1f} {row['num_blocks']:6d} "
                f"{row[f'native_{op}_median_s'] * 1e3:10.2f} "
                f"{row[f'torch_{op}_median_s'] * 1e3:10.2f} "
                f"{row[f'native_{op}_gb_per_s']:12.2f} {row[f'torch_{op}_gb_per_s']:11.2f} "
                f"{row[f'{op}_torch_over_native']:13.2f}"
            )
    print("torch/native = PyTorch time / native time (> 1: native is faster)")

    result = {
        "benchmark": "kv_copy",
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "node": platform.node(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_1min_before_after": [load_before[0], load_after[0]],
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "spec": SPEC.to_dict(),
        "block_bytes": SPEC.block_bytes(),
        "reps": reps,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
