"""Other ways to run a cluster: the colocated role, a real torchrun launch, refused instances."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distserve.engine.executor import free_port
from tests.e2e.conftest import make_cluster
from tests.e2e.test_cluster import NEW_TOKENS, _generate, _prompts

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_colocated_cluster_equals_hf(cluster_model, hf_reference):
    ref = hf_reference(cluster_model)
    prompts = _prompts(4, ref.model.config.vocab_size, seed=3)
    with make_cluster(cluster_model, colocated={"instances": 1}) as c:
        for prompt in prompts:
            tokens, last = _generate(c.grpc_address, prompt)
            assert tokens == ref.greedy(prompt, NEW_TOKENS)[0]
            assert last.prefill_instance == last.decode_instance == "colocated-0"


def _run(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 30) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_torchrun_launched_cpu_cluster_serves(cluster_model, hf_reference, tmp_path):
    """configs/cpu-2p1d.yaml, started exactly as the README says: router + torchrun ranks."""
    config = tmp_path / "cluster.yaml"
    data = yaml.safe_load((ROOT / "configs" / "cpu-2p1d.yaml").read_text())
    data["model"] = str(cluster_model)
    data["router"].update(grpc_port=0, http_port=None, heartbeat_s=0.2)
    data["kv_cache"].update(cpu_memory_gib=0.05)
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ready = tmp_path / "router.json"
    router = _run(
        [
            sys.executable,
            "-m",
            "distserve.cli",
            "router",
            "--config",
            str(config),
            "--ready-file",
            str(ready),
        ],
        env,
        tmp_path / "router.log",
    )
    ranks = None
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert router.poll() is None, (tmp_path / "router.log").read_text()
            assert time.monotonic() < deadline, "router did not start"
            time.sleep(0.1)
        address = json.loads(ready.read_text())["grpc"]
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "3",
        ]
        ranks = _run(
            [
                *torchrun,
                "-m",
                "distserve.cli",
                "launch",
                "--config",
                str(config),
                "--router",
                address,
            ],
            env,
            tmp_path / "torchrun.log",
        )
        from tests.e2e.conftest import list_instances

        while len(list_instances(address)) < 3:
            assert ranks.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
            assert time.monotonic() < deadline + 120, "instances did not register"
            time.sleep(0.2)
        assert sorted(i.descriptor.instance_id for i in list_instances(address)) == [
            "decode-0",
            "prefill-0",
            "prefill-1",
        ]
        ref = hf_reference(cluster_model)
        for prompt in _prompts(2, ref.model.config.vocab_size, seed=4):
            tokens, last = _generate(address, prompt)
            assert tokens == ref.greedy(prompt, NEW_TOKENS)[0]
            assert last.decode_instance == "decode-0"
    finally:
        if ranks is not None:
            _stop(ranks)
        _stop(router)


def _launch_one(
    config_data: dict, router_address: str, tmp_path: Path, name: str
) -> tuple[int, str]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(config_data))
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    log = tmp_path / f"{name}.log"
    proc = _run(
        [
            sys.executable,
            "-m",
            "distserve.cli",
            "launch",
            "--config",
            str(config),
            "--router",
            router_address,
        ],
        env,
        log,
    )
    try:
        proc.wait(180)
    finally:
        _stop(proc, signal.SIGKILL)
    return proc.returncode, log.read_text()


def test_incompatible_instances_are_refused_with_a_clear_error(cluster, tiny_models, tmp_path):
    other_model = tiny_models("llama", seed=1)  # same shapes, other weights
    base = {
        "device": "cpu",
        "colocated": {"instances": 1, "num_threads": 1},
        "kv_cache": {"block_size": 8, "num_blocks": 64},
    }
    code, log = _launch_one(
        {**base, "model": str(other_model)}, cluster.grpc_address, tmp_path, "other-model"
    )
    assert code == 3, log
    assert "refused by the router: model checkpoint differs" in log
    layout = {
        **base,
        "model": str(cluster.model_path),
        "kv_cache": {"block_size": 16, "num_blocks": 64},
    }
    code, log = _launch_one(layout, cluster.grpc_address, tmp_path, "other-layout")
    assert code == 3, log
    assert "KV layout differs from the cluster's: block_size differs: 16 here vs 8" in log
    from tests.e2e.conftest import list_instances

    assert sorted(i.descriptor.instance_id for i in list_instances(cluster.grpc_address)) == [
        "decode-0",
        "prefill-0",
    ]
