"""Real clusters on loopback for end-to-end tests: router + instance processes + a gloo world.

The session-wide ``cluster`` is 1 prefill instance with TP=2 and 1 decode instance with TP=1
(3 ranks), serving a tiny random Llama. Every process is stopped at the end of the session,
also when tests fail.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import grpc
import pytest

from distserve._proto import instance_pb2, instance_pb2_grpc
from distserve.launch.cluster_config import cluster_config_from_dict
from distserve.launch.local_cluster import LocalCluster

NUM_KV_BLOCKS = 512
BLOCK_SIZE = 8


def make_cluster(model_path, **sections) -> LocalCluster:
    config = {
        "model": str(model_path),
        "device": "cpu",
        "router": {"grpc_port": 0, "http_port": 0, "heartbeat_s": 0.2},
        "kv_cache": {
            "block_size": BLOCK_SIZE,
            "num_blocks": NUM_KV_BLOCKS,
            "lease_timeout_s": 20.0,
        },
        **sections,
    }
    for role in ("prefill", "decode", "colocated"):
        config.setdefault(role, {"instances": 0})
        config[role].setdefault("num_threads", 1)
    return LocalCluster(cluster_config_from_dict(config), log_level="WARNING")


def _cluster_processes() -> set[int]:
    """Live processes started from this test process that run distserve."""
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and b"distserve" in cmdline:
            found.add(int(entry.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(tmp_path_factory):
    """After every e2e test has run: no cluster process and no cluster temp folder remains.

    Clusters of this session make their temporary folders in a private directory, so the check
    sees exactly what this session created.
    """
    private = tmp_path_factory.mktemp("cluster-tmp")
    saved, tempfile.tempdir = tempfile.tempdir, str(private)
    try:
        yield
    finally:
        tempfile.tempdir = saved
    left = sorted(p.name for p in private.glob("distserve-*"))
    assert not left, f"temporary folders left behind: {left}"
    assert not _cluster_processes(), "cluster processes outlived the tests"


@pytest.fixture(scope="session")
def cluster_model(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="session")
def cluster(cluster_model):
    """1 prefill (TP=2) + 1 decode (TP=1) behind a router; ``.grpc_address``, ``.http_url``."""
    c = make_cluster(
        cluster_model, prefill={"instances": 1, "tp": 2}, decode={"instances": 1, "tp": 1}
    )
    with c:
        yield c


def list_instances(router_address: str) -> list[instance_pb2.InstanceInfo]:
    with grpc.insecure_channel(router_address) as channel:
        stub = instance_pb2_grpc.RegistryStub(channel)
        return list(stub.ListInstances(instance_pb2.ListInstancesRequest(), timeout=10).instances)


def instance_stats(address: str) -> instance_pb2.InstanceStats:
    with grpc.insecure_channel(address) as channel:
        return instance_pb2_grpc.InstanceStub(channel).GetStats(
            instance_pb2.StatsRequest(), timeout=10
        )
