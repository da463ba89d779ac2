"""The router process: gRPC (Generation, Registry, health, reflection) and the OpenAI HTTP API.

``run_router(config)`` serves until SIGINT/SIGTERM. With ``ready_file`` set it writes the bound
endpoints there as JSON once both servers listen (ports may be 0 = any free port), which is how
``distserve serve`` and the tests find them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from distserve._proto import generation_pb2, generation_pb2_grpc, instance_pb2, instance_pb2_grpc
from distserve.launch.cluster_config import ClusterConfig
from distserve.protocol import model_fingerprint
from distserve.router.core import RouterCore
from distserve.router.grpc_server import GenerationServicer
from distserve.router.metrics import RouterMetrics
from distserve.router.policies import make_policy
from distserve.router.registry import InstanceRegistry, RegistryServicer
from distserve.rpc.options import server_options

logger = logging.getLogger(__name__)


def build_core(config: ClusterConfig) -> tuple[RouterCore, RouterMetrics]:
    from transformers import AutoTokenizer

    from distserve.model.config import ModelConfig

    model_config = ModelConfig.from_pretrained(config.model)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    policy = make_policy(config.router.policy, **config.router.policy_options)
    metrics = RouterMetrics(config.model_name)
    registry = InstanceRegistry(
        model_fingerprint(config.model), policy, config.router.instance_timeout_s, metrics=metrics
    )
    core = RouterCore(
        model_name=config.model_name,
        tokenizer=tokenizer,
        vocab_size=model_config.vocab_size,
        max_model_len=config.max_model_len or model_config.max_position_embeddings,
        registry=registry,
        policy=policy,
        metrics=metrics,
    )
    return core, metrics


class RouterServer:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.core, self.metrics = build_core(config)
        self.grpc_address = ""
        self.http_url: str | None = None
        self._uvicorn = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        r = self.config.router
        self.grpc = grpc.aio.server(options=server_options(max_message_bytes=None))
        generation_pb2_grpc.add_GenerationServicer_to_server(
            GenerationServicer(self.core, r.policy), self.grpc
        )
        instance_pb2_grpc.add_RegistryServicer_to_server(
            RegistryServicer(self.core.registry), self.grpc
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        services = (
            generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
            instance_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(services, self.grpc)
        port = self.grpc.add_insecure_port(f"{r.host}:{r.grpc_port}")
        if port == 0:
            raise OSError(f"cannot listen on {r.host}:{r.grpc_port}")
        self.grpc_address = f"{r.host}:{port}"
        await self.grpc.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.ensure_future(self.core.registry.watch_liveness()))
        if r.http_port is not None:
            await self._start_http(r.host, r.http_port)
        logger.info("router serving gRPC on %s, HTTP on %s", self.grpc_address, self.http_url)

    async def _start_http(self, host: str, port: int) -> None:
        import uvicorn

        from distserve.router.http_api import build_http_app

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.http_url = f"http://{host}:{sock.getsockname()[1]}"
        app = build_http_app(self.core, metrics_registry=self.metrics)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._uvicorn = server
        self._tasks.append(asyncio.ensure_future(server.serve(sockets=[sock])))
        while not server.started:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        await self.grpc.stop(grace=1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.core.registry.close()

    def endpoints(self) -> dict[str, str | None]:
        return {"grpc": self.grpc_address, "http": self.http_url}


async def run_router(config: ClusterConfig, ready_file: str | Path | None = None) -> int:
    server = RouterServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        if ready_file is not None:
            tmp = Path(f"{ready_file}.tmp")
            tmp.write_text(json.dumps(server.endpoints()))
            tmp.replace(ready_file)
        await stop.wait()
    finally:
        await server.stop()
    return 0
