"""KV transfer path vs a raw contiguous send/recv, same gloo world, same run.

Two processes on this machine form a gloo world: rank 0 plays one prefill rank, rank 1 one
decode rank (TP 1 → 1). For each KV size, the request's blocks are spread over a cache shaped
like a real one (many layers and blocks, block ids shuffled and non-contiguous), and one
repetition of each method runs, alternating, several times:

- ``ours``: ``KVReceiver.post_recv`` → ``KVSender.start_send`` (per chunk: gather with one
  index_select, one isend) → receiver ``poll()`` until DONE (per chunk, on arrival: header
  check, index_copy_ scatter), with the library's default chunk size or ``--ours``;
- ``ours @ X`` for each ``--compare`` chunk size X in MB, measured in the same reps (``0``:
  unchunked, one message per transfer as before pipelining), to choose the default;
- ``raw``: ``dist.send`` / ``dist.recv`` of one preallocated contiguous tensor of the same size.

All are timed on the receiver from a common barrier to the data being in place; the median is
reported with the bandwidth (payload bytes / time) and ours/raw. Where the time goes: ``raw`` is
the wire alone; ``gather``/``scatter`` time one whole-transfer index_select / index_copy_ alone
on each rank; ``send call`` is how long ``start_send`` held the sender's engine thread (all its
gathers). Prints a table and writes JSON.

    python benchmarks/kv_transfer.py [--quick] [--compare 0,1,2,8] [--out FILE]
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
from distserve.transfer.chunking import DEFAULT_CHUNK_BYTES

# One rank of a small GQA model: 16 layers, 4 local KV heads of 64, 16-token blocks, bf16.
SPEC = KVCacheSpec(num_layers=16, num_kv_heads=4, head_dim=64, block_size=16, dtype="bfloat16")
SIZES_MB = (1, 4, 16, 64, 256)
QUICK_SIZES_MB = (1, 16, 64)
MB = 1 << 20
POLL_SLEEP_S = 0.0001  # an engine polls once per step; this loop polls far more often
UNCHUNKED_BYTES = 1 << 62  # a chunk size no transfer reaches: one message per (transfer, pair)


def _chunk_bytes(chunk_mb: str) -> int:
    """``"4"`` → 4 MB chunks; ``"0"``: unchunked."""
    return UNCHUNKED_BYTES if float(chunk_mb) == 0 else max(1, int(float(chunk_mb) * MB))


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
    me: KVSender | KVReceiver, desc: TransferDescriptor, ids: list[int]
) -> tuple[float, float]:
    """(seconds until DONE, seconds the start call held this thread)."""
    dist.barrier()
    start_s = time.perf_counter()
    if isinstance(me, KVReceiver):
        me.post_recv(desc, ids)
    else:
        me.start_send(desc, ids)
    call_s = time.perf_counter() - start_s
    _poll_until_done(me)
    return time.perf_counter() - start_s, call_s


def _time_raw(rank: int, tensor: torch.Tensor) -> float:
    dist.barrier()
    start_s = time.perf_counter()
    dist.send(tensor, dst=1) if rank == 0 else dist.recv(tensor, src=0)
    return time.perf_counter() - start_s


def _time_copy(rank: int, cache: torch.Tensor, ids: list[int], reps: int) -> float:
    """Median time of this rank's end of the path alone: gather (rank 0) or scatter (rank 1)."""
    index = block_index(ids, cache.device)
    blocks = torch.index_select(cache, 2, index)  # the same blocks, contiguous: a no-op scatter
    heads = slice(0, SPEC.num_kv_heads)
    copy = gather_blocks if rank == 0 else scatter_blocks  # (cache, index, heads, blocks)
    times = []
    for _ in range(reps):
        start_s = time.perf_counter()
        copy(cache, index, heads, blocks)
        times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def _measure_size(rank: int, size_mb: int, reps: int, variants: list[str]) -> dict[str, Any]:
    num_blocks = max(1, size_mb * MB // SPEC.block_bytes())
    cache_blocks = num_blocks * 3 // 2 + 8
    shape = (SPEC.num_layers, 2, cache_blocks, SPEC.block_size, SPEC.num_kv_heads, SPEC.head_dim)
    cache = _filled_cache(shape, seed=rank)
    rng = random.Random(size_mb)
    src_ids, dst_ids = (
        rng.sample(range(cache_blocks), num_blocks),
        rng.sample(range(cache_blocks), num_blocks),
    )
    ids = src_ids if rank == 0 else dst_ids
    expected = _filled_cache(shape, seed=0)[:, :, src_ids] if rank == 1 else None
    backend = create_backend("gloo", torch.device("cpu"))
    endpoint = KVSender if rank == 0 else KVReceiver
    endpoints = [endpoint(cache, rank, backend, chunk_bytes=_chunk_bytes(v)) for v in variants]
    raw = torch.empty(num_blocks * SPEC.block_bytes(), dtype=torch.uint8).fill_(1)
    raw_s: list[float] = []
    ours_s: list[list[float]] = [[] for _ in endpoints]
    call_s: list[list[float]] = [[] for _ in endpoints]
    for rep in range(reps + 1):  # the first of each is a warm-up
        t_raw = _time_raw(rank, raw)
        for i, me in enumerate(endpoints):
            if expected is not None and rep == reps:  # last rep: each variant must land the KV
                cache[:, :, dst_ids] = 0
            desc = TransferDescriptor(f"{size_mb}mb-{i}-{rep}", rep, num_blocks, (0,), (1,), SPEC)
            t_ours, t_call = _time_ours(me, desc, ids)
            if expected is not None and rep == reps:
                assert torch.equal(cache[:, :, dst_ids], expected), f"{variants[i]} corrupted"
            if rep:
                ours_s[i].append(t_ours)
                call_s[i].append(t_call)
        if rep:
            raw_s.append(t_raw)
    backend.close()
    copy_s = _time_copy(rank, cache, ids, reps)
    send_call_s = statistics.median(call_s[0])
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, (copy_s, send_call_s))
    payload_bytes = num_blocks * SPEC.block_bytes()
    raw_median_s = statistics.median(raw_s)
    ours_median_s = [statistics.median(times) for times in ours_s]
    return {
        "size_mb": payload_bytes / MB,
        "num_blocks": num_blocks,
        "payload_bytes": payload_bytes,
        "chunk_mb": variants[0],  # 0: unchunked
        "raw_median_s": raw_median_s,
        "ours_median_s": ours_median_s[0],
        "raw_gb_per_s": payload_bytes / raw_median_s / 1e9,
        "ours_gb_per_s": payload_bytes / ours_median_s[0] / 1e9,
        "ours_over_raw": raw_median_s / ours_median_s[0],
        "gather_median_s": gathered[0][0],  # the sender's whole-transfer index_select alone
        "scatter_median_s": gathered[1][0],  # the receiver's whole-transfer index_copy_ alone
        "send_call_median_s": gathered[0][1],  # start_send on the sender's thread (its gathers)
        "compare": [
            {"chunk_mb": v, "ours_median_s": t, "ours_over_raw": raw_median_s / t, "all_s": a}
            for v, t, a in zip(variants[1:], ours_median_s[1:], ours_s[1:])
        ],
        "raw_all_s": raw_s,
        "ours_all_s": ours_s[0],
    }


def _rank_main(
    rank: int, port: int, sizes_mb: list[int], reps: int, variants: list[str], out_path: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        rows = [_measure_size(rank, size_mb, reps, variants) for size_mb in sizes_mb]
        if rank == 1:
            Path(out_path).write_text(json.dumps(rows))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_world(
    sizes_mb: list[int], reps: int, variants: list[str], timeout_s: float
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        context = mp.start_processes(
            _rank_main,
            args=(_free_port(), sizes_mb, reps, variants, out_path),
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


def _print_table(rows: list[dict[str, Any]], header: str) -> None:
    print(header)
    compare = [f"@{c['chunk_mb']}MB" for c in rows[0]["compare"]]
    print(
        f"{'KV MB':>7} {'blocks':>7} {'raw ms':>8} {'ours ms':>8} {'raw GB/s':>9} "
        f"{'ours GB/s':>10} {'ours/raw':>9} {'gather ms':>10} {'scatter ms':>11} "
        f"{'send call':>10}" + "".join(f" {name + ' o/r':>9}" for name in compare)
    )
    for row in rows:
        print(
            f"{row['size_mb']:7.1f} {row['num_blocks']:7d} {row['raw_median_s'] * 1e3:8.2f} "
            f"{row['ours_median_s'] * 1e3:8.2f} {row['raw_gb_per_s']:9.2f} "
            f"{row['ours_gb_per_s']:10.2f} {row['ours_over_raw']:9.2f} "
            f"{row['gather_median_s'] * 1e3:10.2f} {row['scatter_median_s'] * 1e3:11.2f} "
            f"{row['send_call_median_s'] * 1e3:10.2f}"
            + "".join(f" {c['ours_over_raw']:9.2f}" for c in row["compare"])
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/kv_transfer.json", help="JSON result file")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--reps", type=int, default=None, help="per size (7; 3 with --quick)")
    parser.add_argument(
        "--ours",
        default=f"{DEFAULT_CHUNK_BYTES / MB:g}",
        help="chunk MB of 'ours' (default: the library's; 0: unchunked)",
    )
    split = lambda text: text.split(",")  # noqa: E731
    parser.add_argument("--compare", type=split, default=[], help="chunk MBs, same reps")
    parser.add_argument("--sizes-mb", type=split, default=None, help="KV sizes in MB")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="kill the world then")
    args = parser.parse_args(argv)
    sizes_mb = [int(x) for x in args.sizes_mb or (QUICK_SIZES_MB if args.quick else SIZES_MB)]
    reps = args.reps or (3 if args.quick else 7)
    variants = [args.ours, *args.compare]
    load_before = os.getloadavg()
    rows = _run_world(sizes_mb, reps, variants, args.timeout_s)
    load_after = os.getloadavg()
    _print_table(
        rows,
        f"KV transfer over gloo, 2 processes on {platform.node()} ({os.cpu_count()} CPUs, "
        f"load {load_before[0]:.1f} -> {load_after[0]:.1f}), {reps} reps, median; ours: "
        f"{args.ours}",
    )
    command = [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
    machine = {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()}
    result = {
        "benchmark": "kv_transfer",
        "command": " ".join(command),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine, "loadavg_1min_before_after": [load_before[0], load_after[0]]},
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
