"""``distserve serve``: a whole cluster on this machine, one command.

With no arguments it serves a small random demo model on CPU (made on first use and cached),
with a router, one prefill instance and one decode instance, and prints the endpoints. Ctrl-C
stops every process it started.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path

from distserve import envs
from distserve.launch.cluster_config import (
    ClusterConfig,
    cluster_config_from_dict,
    load_cluster_config,
)
from distserve.launch.local_cluster import LocalCluster

logger = logging.getLogger(__name__)

DEMO_ARCH = "llama"


def demo_model_path() -> Path:
    """The demo checkpoint, made on first use (a random tiny Llama with a byte-level tokenizer)."""
    path = envs.cache_dir() / f"demo-{DEMO_ARCH}-tiny"
    if not (path / "config.json").exists():
        from distserve.model.tiny_model import make_tiny_model

        print(f"making the demo model in {path} (first run only)")
        tmp = path.with_name(path.name + ".partial")
        make_tiny_model(tmp, arch=DEMO_ARCH, seed=0, preset="tiny")
        tmp.rename(path)
    return path


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder (default: the built-in demo model)")
    parser.add_argument(
        "--config", help="cluster YAML (default: router + 1 prefill + 1 decode on CPU)"
    )
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=None, help="router gRPC port (default 50051; 0 = any free)"
    )
    parser.add_argument(
        "--http-port", type=int, default=None, help="OpenAI HTTP port (default 8000; 0 = any free)"
    )
    parser.add_argument("--policy", default=None, help="routing policy (default round_robin)")
    parser.add_argument(
        "--log-dir", default=None, help="where process logs go (default: a folder in the cache)"
    )


def serve_config(args: argparse.Namespace) -> ClusterConfig:
    model = args.model
    if args.config:
        config = load_cluster_config(args.config, model=model)
    else:
        config = cluster_config_from_dict(
            {
                "model": str(model or demo_model_path()),
                "device": "cpu" if model is None else "auto",
                "prefill": {"instances": 1},
                "decode": {"instances": 1},
            }
        )
    router = config.to_dict()["router"]
    for key, value in (
        ("host", args.host),
        ("grpc_port", args.port),
        ("http_port", args.http_port),
        ("policy", args.policy),
    ):
        if value is not None:
            router[key] = value
    return config.replace(router=router)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop cleanly under systemd, timeout, kill
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in the background
    config = serve_config(args)
    log_dir = (
        Path(args.log_dir)
        if args.log_dir
        else envs.cache_dir() / "logs" / time.strftime("%Y%m%d-%H%M%S")
    )
    roles = ", ".join(
        f"{config.pool(r).instances} {r}"
        for r in ("prefill", "decode", "colocated")
        if config.pool(r).instances
    )
    print(f"starting router + {roles} for {config.model} (logs: {log_dir})", flush=True)
    cluster = LocalCluster(config, log_dir=log_dir, log_level=args.log_level)
    try:
        cluster.start()
        print(
            f"\ndistserve is serving {config.model_name}\n"
            f'  gRPC:   {cluster.grpc_address}    try: distserve generate --endpoint {cluster.grpc_address} "hello"\n'
            + (
                f"  OpenAI: {cluster.http_url}/v1  (/v1/completions, /v1/chat/completions, /metrics)\n"
                if cluster.http_url
                else ""
            )
            + "Press Ctrl-C to stop.",
            flush=True,
        )
        code = cluster.wait()
        print(f"a cluster process exited with code {code}; stopping", flush=True)
        return code or 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        # A second Ctrl-C (or a signal forwarded by a wrapper) must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
