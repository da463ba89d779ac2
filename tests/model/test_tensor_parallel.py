"""TP=2 on CPU (two spawned processes, gloo) gives the same logits as TP=1 on every rank."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from distserve.model.loader import load_model
from distserve.model.tiny_model import make_tiny_model
from tests.model.tp_worker import run_rank, run_scenario

TIMEOUT_S = 240
MODELS: dict[str, tuple[str, dict[str, object]]] = {
    "llama-gqa": ("llama", {}),  # 4 query heads, 2 KV heads: one KV head per rank
    "llama-mqa-tied-bias": (  # one KV head replicated on both ranks; row-parallel o_proj bias
        "llama",
        {"kv_heads": 1, "tie_word_embeddings": True, "attention_bias": True},
    ),
    "qwen2": ("qwen2", {}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_matches_tp1(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model_dirs = {
        name: str(make_tiny_model(tmp_path / name, arch=arch, seed=5, **overrides))
        for name, (arch, overrides) in MODELS.items()
    }
    context = mp.start_processes(
        run_rank,
        args=(2, _free_port(), model_dirs, str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            assert time.monotonic() < deadline, f"TP=2 ranks did not finish in {TIMEOUT_S}s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    for name, model_dir in model_dirs.items():
        expected = run_scenario(load_model(model_dir, dtype=torch.float32))
        for rank in range(2):
            got = torch.load(tmp_path / f"{name}-rank{rank}.pt")
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=f"{name} rank {rank}")
