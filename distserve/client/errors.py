"""Exceptions of the client SDK, and the one place that turns gRPC status codes into them.

    DistserveError            base: anything the SDK raises on purpose
    ├── InvalidRequest        INVALID_ARGUMENT: the router refused the request (its message kept)
    ├── ServerUnavailable     UNAVAILABLE: no router at the endpoint, or the cluster cannot serve
    └── RequestTimeout        DEADLINE_EXCEEDED: the request ran past its timeout

It does not own retries: the SDK never retries on its own, so a caller sees every failure.
"""

from __future__ import annotations

import grpc


class DistserveError(Exception):
    """Base class of the SDK's errors; ``code`` is the gRPC status name when there is one."""

    def __init__(self, message: str, *, code: str = "", endpoint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.endpoint = endpoint


class InvalidRequest(DistserveError):
    """The router refused the request as malformed; ``message`` is the server's explanation."""


class ServerUnavailable(DistserveError):
    """No router answered at the endpoint, or the cluster could not serve the request."""


class RequestTimeout(DistserveError):
    """The request did not finish within its timeout."""


def from_rpc_error(err: grpc.RpcError, endpoint: str, timeout_s: float | None) -> DistserveError:
    """The SDK error for a failed call (``err`` is a ``grpc.Call`` as well as an ``RpcError``)."""
    code: grpc.StatusCode | None = err.code()  # type: ignore[attr-defined]
    return from_status(code, err.details() or "", endpoint, timeout_s)  # type: ignore[attr-defined]


def from_status(
    code: grpc.StatusCode | None, details: str, endpoint: str, timeout_s: float | None
) -> DistserveError:
    """The SDK error for a request that ended with status ``code``: a failed call, or a
    request's ``error`` event on a multiplexed stream (the same status, the same error)."""
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(details or "invalid request", code=name, endpoint=endpoint)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailable(
            f"distserve router at {endpoint} is unavailable: {details or 'no answer'}",
            code=name,
            endpoint=endpoint,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        limit = f"{timeout_s:g} s" if timeout_s is not None else "its deadline"
        return RequestTimeout(
            f"request to {endpoint} did not finish within {limit}", code=name, endpoint=endpoint
        )
    return DistserveError(f"{name} from {endpoint}: {details}", code=name, endpoint=endpoint)
