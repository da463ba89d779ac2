"""``distserve router --config cluster.yaml``: the router alone (instances register with it)."""

from __future__ import annotations

import argparse
import asyncio

from distserve.launch.cluster_config import load_cluster_config


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="cluster YAML (see configs/)")
    parser.add_argument("--model", help="override the config's model path")
    parser.add_argument("--host", help="address to listen on (default: router.host)")
    parser.add_argument(
        "--port", type=int, help="gRPC port (default: router.grpc_port; 0 = any free)"
    )
    parser.add_argument(
        "--http-port", type=int, help="HTTP port (default: router.http_port; 0 = any free)"
    )
    parser.add_argument("--policy", help="routing policy (default: router.policy)")
    parser.add_argument("--ready-file", help="write the bound endpoints here as JSON once serving")


def run_router(args: argparse.Namespace) -> int:
    from distserve.router.server import run_router as serve

    config = load_cluster_config(args.config, model=args.model)
    router = {
        k: v
        for k, v in {
            "host": args.host,
            "grpc_port": args.port,
            "http_port": args.http_port,
            "policy": args.policy,
        }.items()
        if v is not None
    }
    if router:
        config = config.replace(router={**config.to_dict()["router"], **router})
    return asyncio.run(serve(config, ready_file=args.ready_file))
