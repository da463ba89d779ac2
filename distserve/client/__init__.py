"""Python SDK of a distserve router's public gRPC API (``distserve.v1.Generation``).

``Client`` (blocking) and ``AsyncClient`` (asyncio) send one request each call and measure its
timings on the client side; errors are the classes of :mod:`distserve.client.errors`.
``AsyncClient`` sends all of its requests on one multiplexed ``GenerateStream`` by default
(``multiplex=False``: one ``Generate`` call each); ``Client`` makes a call per request unless
built with ``multiplex=True``. The
``distserve generate`` command lives in :mod:`distserve.client.cli`.
"""

from distserve.client.async_client import AsyncClient
from distserve.client.client import Client
from distserve.client.errors import (
    DistserveError,
    InvalidRequest,
    RequestTimeout,
    ServerUnavailable,
)
from distserve.client.types import Completion, ModelInfo, StreamChunk, TokenUsage

__all__ = [
    "AsyncClient",
    "Client",
    "Completion",
    "DistserveError",
    "InvalidRequest",
    "ModelInfo",
    "RequestTimeout",
    "ServerUnavailable",
    "StreamChunk",
    "TokenUsage",
]
