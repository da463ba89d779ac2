"""How an instance driver joins the router: the Register call, retried while the router starts.

Shared by real instance drivers (``server.py``) and simulated ones (``simulated.py``), so that
both speak the registry protocol the same way.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from distserve._proto import instance_pb2, instance_pb2_grpc

logger = logging.getLogger(__name__)

_RETRY_S = 0.25
_ATTEMPTS = 600  # 150 s for a router that is still starting


class RegistrationRefused(RuntimeError):
    """The router refused this instance (incompatible model or KV layout, duplicate id), or
    never answered."""


async def register(
    channel: grpc.aio.Channel, descriptor: instance_pb2.InstanceDescriptor, router_address: str
) -> None:
    """Register ``descriptor`` with the router on ``channel``; raises :class:`RegistrationRefused`."""
    stub = instance_pb2_grpc.RegistryStub(channel)
    for attempt in range(_ATTEMPTS):
        try:
            reply = await stub.Register(descriptor, timeout=5)
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            if attempt % 20 == 0:
                logger.info("waiting for the router at %s", router_address)
            await asyncio.sleep(_RETRY_S)
    else:
        raise RegistrationRefused(f"router at {router_address} never answered")
    if not reply.accepted:
        raise RegistrationRefused(reply.reason)
