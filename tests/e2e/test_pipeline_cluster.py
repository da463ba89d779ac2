"""Pipeline-parallel colocated instances in a real cluster; PP is refused for prefill/decode."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from distserve.launch.cluster_config import ConfigError, cluster_config_from_dict
from tests.e2e.conftest import list_instances, make_cluster
from tests.e2e.test_cluster import NEW_TOKENS, _generate, _prompts
from tests.e2e.test_launch import _run, _stop


def _config(**pools) -> dict:
    return {"model": "/nonexistent", "device": "cpu", **pools}


def test_pp_is_refused_for_prefill_and_decode_pools_and_laid_out_by_stage_for_colocated():
    for role in ("prefill", "decode"):
        pools = {"prefill": {"instances": 1}, "decode": {"instances": 1}}
        pools[role]["pp"] = 2
        with pytest.raises(ConfigError, match=rf"{role}\.pp: got 2: pipeline parallelism is"):
            cluster_config_from_dict(_config(**pools))
    with pytest.raises(ConfigError, match=r"colocated\.pp: must be >= 1, got 0"):
        cluster_config_from_dict(_config(colocated={"instances": 1, "pp": 0}))
    config = cluster_config_from_dict(_config(colocated={"instances": 2, "tp": 2, "pp": 2}))
    assert config.world_size == 8
    assert [p.ranks for p in config.instances()] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [p.driver_rank for p in config.instances()] == [0, 4]


@pytest.mark.slow
def test_colocated_pp2_tp2_cluster_equals_hf(cluster_model, hf_reference):
    """One instance of 4 ranks: (stage, TP rank) = (0,0) driver, (0,1), (1,0), (1,1)."""
    ref = hf_reference(cluster_model)
    prompts = _prompts(1, ref.model.config.vocab_size, seed=7)
    with make_cluster(cluster_model, colocated={"instances": 1, "tp": 2, "pp": 2}) as c:
        (info,) = list_instances(c.grpc_address)
        assert list(info.descriptor.global_ranks) == [0, 1, 2, 3]
        for prompt in prompts:
            tokens, last = _generate(c.grpc_address, prompt)
            assert tokens == ref.greedy(prompt, NEW_TOKENS)[0]
            assert last.prefill_instance == last.decode_instance == "colocated-0"


@pytest.mark.slow
def test_torchrun_launched_colocated_pp2_serves(cluster_model, hf_reference, tmp_path: Path):
    """``torchrun --nproc-per-node 2 ... distserve launch`` with one colocated TP=1 x PP=2."""
    config = tmp_path / "cluster.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(cluster_model),
                "device": "cpu",
                "router": {"grpc_port": 0, "http_port": None, "heartbeat_s": 0.2},
                "colocated": {"instances": 1, "tp": 1, "pp": 2, "num_threads": 1},
                "kv_cache": {"block_size": 8, "num_blocks": 256},
            }
        )
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ready = tmp_path / "router.json"
    router = _run(
        [sys.executable, "-m", "distserve.cli", "router", "--config", str(config),
         "--ready-file", str(ready)],
        env,
        tmp_path / "router.log",
    )  # fmt: skip
    ranks = None
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert router.poll() is None, (tmp_path / "router.log").read_text()
            assert time.monotonic() < deadline, "router did not start"
            time.sleep(0.1)
        address = json.loads(ready.read_text())["grpc"]
        ranks = _run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", "-m", "distserve.cli", "launch", "--config", str(config), "--router", address],
            env,
            tmp_path / "torchrun.log",
        )  # fmt: skip
        while not list_instances(address):
            assert ranks.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
            assert time.monotonic() < deadline + 120, "the instance did not register"
            time.sleep(0.2)
        ref = hf_reference(cluster_model)
        for prompt in _prompts(2, ref.model.config.vocab_size, seed=8):
            tokens, last = _generate(address, prompt)
            assert tokens == ref.greedy(prompt, NEW_TOKENS)[0]
            assert last.decode_instance == "colocated-0"
    finally:
        if ranks is not None:
            _stop(ranks)
        _stop(router)
