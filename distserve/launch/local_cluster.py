"""A whole cluster on this machine, as real processes: the router plus one process per rank.

Used by ``distserve serve`` and by the end-to-end tests. The ranks get the environment torchrun
would give them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so this is exactly the
multi-node path with every node on loopback. Children run in their own sessions; ``stop()`` asks
the instance drivers to stop (SIGINT), then the router, and kills whatever is left, so nothing
outlives the cluster even when a test fails.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from distserve._proto import generation_pb2, generation_pb2_grpc
from distserve.engine.executor import free_port
from distserve.launch.cluster_config import ClusterConfig

logger = logging.getLogger(__name__)


class ClusterStartError(RuntimeError):
    """The cluster did not come up; the message includes the failing process's log tail."""


class LocalCluster:
    def __init__(
        self,
        config: ClusterConfig,
        *,
        log_dir: str | Path | None = None,
        log_level: str = "INFO",
        startup_timeout_s: float = 180.0,
    ) -> None:
        self.config = config
        self._own_dir = tempfile.TemporaryDirectory(prefix="distserve-")
        self.workdir = Path(self._own_dir.name)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.log_level = log_level
        self.startup_timeout_s = startup_timeout_s
        self.router: subprocess.Popen | None = None
        self.ranks: list[subprocess.Popen] = []
        self._logs: dict[str, Path] = {}
        self.grpc_address = ""
        self.http_url: str | None = None

    @property
    def model_path(self) -> str:
        return self.config.model

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> LocalCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        config_path = self.workdir / "cluster.yaml"
        config_path.write_text(self.config.to_yaml())
        ready = self.workdir / "router.json"
        self.router = self._spawn(
            "router",
            ["router", "--config", str(config_path), "--ready-file", str(ready)],
            os.environ.copy(),
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while not ready.exists():
            self._check_alive(self.router, "router")
            self._check_deadline(deadline, "the router to listen")
            time.sleep(0.05)
        endpoints = json.loads(ready.read_text())
        self.grpc_address, self.http_url = endpoints["grpc"], endpoints["http"]

        master_port = free_port()
        for rank in range(self.config.world_size):
            env = os.environ.copy()
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(self.config.world_size),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(master_port),
                DISTSERVE_HOST="127.0.0.1",
            )
            args = ["launch", "--config", str(config_path), "--router", self.grpc_address]
            self.ranks.append(self._spawn(f"rank{rank}", args, env))
        self._wait_registered(deadline)

    def _wait_registered(self, deadline: float) -> None:
        want = {
            role: self.config.pool(role).instances for role in ("prefill", "decode", "colocated")
        }
        with grpc.insecure_channel(self.grpc_address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            while True:
                for i, proc in enumerate(self.ranks):
                    self._check_alive(proc, f"rank{i}")
                self._check_alive(self.router, "router")
                info = stub.GetModelInfo(generation_pb2.ModelInfoRequest(), timeout=5)
                have = {
                    "prefill": info.num_prefill_instances,
                    "decode": info.num_decode_instances,
                    "colocated": info.num_colocated_instances,
                }
                if have == want:
                    return
                self._check_deadline(deadline, f"instances to register (have {have}, want {want})")
                time.sleep(0.1)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop every process (drivers first, so they can stop their ranks), then clean up."""
        procs = [p for p in self.ranks if p.poll() is None]
        for p in procs:
            _signal(p, signal.SIGINT)
        _wait_all(procs, timeout_s)
        if self.router is not None and self.router.poll() is None:
            _signal(self.router, signal.SIGINT)
            _wait_all([self.router], 5.0)
        for p in [*self.ranks, *([self.router] if self.router else [])]:
            if p.poll() is None:
                _signal(p, signal.SIGKILL)
                p.wait(5)
        self.ranks.clear()
        self.router = None
        self._own_dir.cleanup()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self) -> int:
        """Block until a process exits (or Ctrl-C); returns the first exit code seen."""
        while True:
            for p in [self.router, *self.ranks]:
                if p is not None and p.poll() is not None:
                    return p.returncode
            time.sleep(0.2)

    # ---- helpers -------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "distserve.cli", "--log-level", self.log_level, *args]
        if self.log_dir is None:
            log_path = self.workdir / f"{name}.log"
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}.log"
        self._logs[name] = log_path
        log = log_path.open("wb")
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return proc

    def log_tail(self, name: str, num_lines: int = 30) -> str:
        path = self._logs.get(name)
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])

    def _check_alive(self, proc: subprocess.Popen | None, name: str) -> None:
        if proc is not None and proc.poll() is not None:
            raise ClusterStartError(
                f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}"
            )

    def _check_deadline(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n}\n{self.log_tail(n, 10)}" for n in self._logs)
            raise ClusterStartError(
                f"timed out after {self.startup_timeout_s:.0f}s waiting for {what}\n{tails}"
            )


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if this (parent) process dies, so no orphans remain.

    Also restores SIGINT, which a parent started in the background by a shell inherits as
    ignored, so that ``stop()`` can ask the children to stop gracefully.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: stop() still cleans up on a normal exit


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
