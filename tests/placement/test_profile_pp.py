"""``distserve profile --pp 2`` runs the real pipelined engine and writes a (tp, pp) entry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from placement.profile_format import load_profile, save_profile
from placement.profiler import ProfileOptions, run_profiler

pytestmark = pytest.mark.slow


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="PP=2 pins one core per rank")
def test_profile_tp1_pp2_on_the_tiny_model_writes_a_1_2_entry(
    tiny_llama: Path, tmp_path: Path
) -> None:
    opts = ProfileOptions(
        model_path=str(tiny_llama),
        model_name="tiny",
        tps=(1,),
        pps=(2,),
        quick=True,
        max_prompt_len=64,
        max_batch_size=4,
        kv_cache_gib=0.02,
        device="cpu",
        show_progress=False,
    )
    profile, report = run_profiler(opts)
    model = profile.models["tiny"]
    assert list(model.configs) == [(1, 2)]
    cfg = model.configs[1, 2]
    assert cfg.tp == 1 and cfg.pp == 2
    assert len(cfg.samples["prefill"]) > 3 and cfg.samples["decode"]
    # Each of the 2 ranks holds 1 of the 2 layers: a rank's KV budget holds twice the blocks.
    per_token_per_rank = model.kv_bytes_per_token // 2
    assert cfg.kv_capacity_tokens == int(0.02 * 2**30 // (per_token_per_rank * 16)) * 16
    assert "TP=1 PP=2" in report
    save_profile(profile, tmp_path / "profile.json")
    loaded = load_profile(tmp_path / "profile.json").models["tiny"]
    assert loaded.configs[1, 2].kv_capacity_tokens == cfg.kv_capacity_tokens
    assert loaded.kv_capacity(1, 2) == cfg.kv_capacity_tokens  # measured, not scaled from pp=1
    # the measured entry is a whole pass (no micro-batching): the planner must not pipeline it
    assert not cfg.micro_batched and not loaded.latency(1, 2).micro_batched
