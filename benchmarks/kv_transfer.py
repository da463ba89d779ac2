"""KV transfer path vs a raw contiguous send/recv, same gloo world, same run.

Two processes on this machine form a gloo world: rank 0 plays one prefill rank, rank 1 one
decode rank (TP 1 → 1). For each KV size, the request's blocks are spread over a cache shaped
like a real one (many layers and blocks, block ids shuffled and non-contiguous), and one
repetition of each method runs, alternating, several times:

- ``ours``: ``KVReceiver.post_recv`` → ``KVSender.start_send`` (gather with one index_select,
  one isend) → receiver ``poll()`` until DONE (irecv, header check, index_copy_ scatter);
- ``raw``: ``dist.send`` / ``dist.recv`` of one preallocated contiguous tensor of the same size.

Both are timed on the receiver from a common barrier to the data being in place; the median is
reported with the bandwidth (payload bytes / time) and ours/raw. Prints a table and writes JSON.

    python benchmarks/kv_transfer.py [--quick] [--out results/kv_transfer.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distserve.engine.kv_spec import KVCacheSpec
from distserve.transfer import KVReceiver, KVSender, TransferDescriptor, create_backend
from distserve.transfer.block_copy import block_index, gather_blocks, scatter_blocks

# One rank of a small GQA model: 16 layers, 4 local KV heads of 64, 16-token blocks, bf16.
SPEC = KVCacheSpec(num_layers=16, num_kv_heads=4, head_dim=64, block_size=16, dtype="bfloat16")
SIZES_MB = (1, 4, 16, 64, 256)
QUICK_SIZES_MB = (1, 16, 64)
MB = 1 << 20
POLL_SLEEP_S = 0.0001  # an engine polls once per step; this loop polls far more often


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _filled_cache(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.bfloat16)


def _poll_until_done(endpoint: KVSender | KVReceiver) -> None:
    while True:
        results = endpoint.poll()
        if results:
            (result,) = results
            assert result.is_ok, result
            return
        time.sleep(POLL_SLEEP_S)


def _time_ours(
    rank: int, me: KVSender | KVReceiver, desc: TransferDescriptor, ids: list[int]
) -> float:
    dist.barrier()
    start_s = time.perf_counter()
    if isinstance(me, KVReceiver):
        me.post_recv(desc, ids)
    else:
        me.start_send(desc, ids)
    _poll_until_done(me)
    return time.perf_counter() - start_s


def _time_raw(rank: int, tensor: torch.Tensor) -> float:
    dist.barrier()
    start_s = time.perf_counter()
    if rank == 0:
        dist.send(tensor, dst=1)
    else:
        dist.recv(tensor, src=0)
    return time.perf_counter() - start_s


def _time_copy(rank: int, cache: torch.Tensor, ids: list[int], reps: int) -> float:
    """Median time of this rank's end of the path alone: gather (rank 0) or scatter (rank 1)."""
    index = block_index(ids, cache.device)
    blocks = torch.index_select(cache, 2, index)  # the same blocks, contiguous: a no-op scatter
    heads = slice(0, SPEC.num_kv_heads)
    times = []
    for _ in range(reps):
        start_s = time.perf_counter()
        if rank == 0:
            gather_blocks(cache, index, heads, out=blocks)
        else:
            scatter_blocks(cache, index, heads, blocks)
        times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def _measure_size(rank: int, size_mb: int, reps: int) -> dict[str, Any]:
    num_blocks = max(1, size_mb * MB // SPEC.block_bytes())
    cache_blocks = num_blocks * 3 // 2 + 8
    shape = (SPEC.num_layers, 2, cache_blocks, SPEC.block_size, SPEC.num_kv_heads, SPEC.head_dim)
    cache = _filled_cache(shape, seed=rank)
    rng = random.Random(size_mb)
    src_ids, dst_ids = (
        rng.sample(range(cache_blocks), num_blocks),
        rng.sample(range(cache_blocks), num_blocks),
    )
    backend = create_backend("gloo", torch.device("cpu"))
    me: KVSender | KVReceiver = (KVSender if rank == 0 else KVReceiver)(cache, rank, backend)
    raw = torch.empty(num_blocks * SPEC.block_bytes(), dtype=torch.uint8).fill_(1)
    ours_s, raw_s = [], []
    for rep in range(reps + 1):  # the first of each is a warm-up
        desc = TransferDescriptor(f"{size_mb}mb-{rep}", rep, num_blocks, (0,), (1,), SPEC)
        ids = src_ids if rank == 0 else dst_ids
        t_raw, t_ours = _time_raw(rank, raw), _time_ours(rank, me, desc, ids)
        if rep:
            raw_s.append(t_raw)
            ours_s.append(t_ours)
    if rank == 1:  # the data really landed: the last transfer's blocks equal rank 0's
        expected = _filled_cache(shape, seed=0)[:, :, src_ids]
        assert torch.equal(cache[:, :, dst_ids], expected), f"{size_mb} MB transfer corrupted"
    backend.close()
    copy_s = _time_copy(rank, cache, src_ids if rank == 0 else dst_ids, reps)
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, copy_s)
    payload_bytes = num_blocks * SPEC.block_bytes()
    raw_median_s, ours_median_s = statistics.median(raw_s), statistics.median(ours_s)
    return {
        "size_mb": payload_bytes / MB,
        "num_blocks": num_blocks,
        "payload_bytes": payload_bytes,
        "raw_median_s": raw_median_s,
        "ours_median_s": ours_median_s,
        "raw_gb_per_s": payload_bytes / raw_median_s / 1e9,
        "ours_gb_per_s": payload_bytes / ours_median_s / 1e9,
        "ours_over_raw": raw_median_s / ours_median_s,
        "gather_median_s": gathered[0],  # the sender's index_select alone
        "scatter_median_s": gathered[1],  # the receiver's index_copy_ alone
        "raw_all_s": raw_s,
        "ours_all_s": ours_s,
    }


def _rank_main(rank: int, port: int, sizes_mb: list[int], reps: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        rows = [_measure_size(rank, size_mb, reps) for size_mb in sizes_mb]
        if rank == 1:
            Path(out_path).write_text(json.dumps(rows))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_world(sizes_mb: list[int], reps: int, timeout_s: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        context = mp.start_processes(
            _rank_main,
            args=(_free_port(), sizes_mb, reps, out_path),
            nprocs=2,
            join=False,
            daemon=True,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic()), grace_period=2.0):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"benchmark world still running after {timeout_s} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(timeout=5.0)
        return json.loads(Path(out_path).read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/kv_transfer.json", help="JSON result file")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions per size (default 7; 3 with --quick)"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=900.0, help="kill the world after this long"
    )
    args = parser.parse_args(argv)
    sizes_mb = list(QUICK_SIZES_MB if args.quick else SIZES_MB)
    reps = args.reps or (3 if args.quick else 7)
    load_before = os.getloadavg()
    rows = _run_world(sizes_mb, reps, args.timeout_s)
    load_after = os.getloadavg()

    print(
        f"KV transfer over gloo, 2 processes on {platform.node()} ({os.cpu_count()} CPUs, "
        f"load {load_before[0]:.1f} -> {load_after[0]:.1f}), {reps} reps, median"
    )
    print(
        f"{'KV MB':>7} {'blocks':>7} {'raw ms':>9} {'ours ms':>9} {'raw GB/s':>9} "
        f"{'ours GB/s':>10} {'ours/raw':>9} {'gather ms':>10} {'scatter ms':>11}"
    )
    for row in rows:
        print(
            f"{row['size_mb']:7.1f} {row['num_blocks']:7d} {row['raw_median_s'] * 1e3:9.2f} "
            f"{row['ours_median_s'] * 1e3:9.2f} {row['raw_gb_per_s']:9.2f} "
            f"{row['ours_gb_per_s']:10.2f} {row['ours_over_raw']:9.2f} "
            f"{row['gather_median_s'] * 1e3:10.2f} {row['scatter_median_s'] * 1e3:11.2f}"
        )
    result = {
        "benchmark": "kv_transfer",
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
        "backend": "gloo",
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
