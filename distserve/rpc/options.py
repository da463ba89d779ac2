"""gRPC channel and server options shared by every distserve process: keepalive and message size.

Long-lived streams (a router's ``Session`` to each instance, a client's ``GenerateStream``) can
sit idle for minutes between requests. Without keepalive, a connection that died silently (a
host that vanished, a NAT or load balancer that dropped the flow) is noticed only when a request
on it reaches its deadline. So every channel pings its server every ``keepalive_s`` while a call
is open, also when no data flows, and treats the connection as dead when a ping is not answered
within ``KEEPALIVE_TIMEOUT_MS``: the open calls fail with UNAVAILABLE, which the router and the
SDK already handle (the next request opens a new stream).

Servers must accept pings that often: gRPC's defaults refuse pings without data more often than
every five minutes, and after two such "strikes" close the connection with GOAWAY
``too_many_pings``, which would break every idle stream. Our servers accept one every
``keepalive_s / 2``.

``DISTSERVE_GRPC_KEEPALIVE_S`` (``distserve.envs``) sets the interval for every process that
reads it; the default is 30 s.
"""

from __future__ import annotations

from distserve.envs import grpc_keepalive_s

MAX_MESSAGE_BYTES = 64 << 20
KEEPALIVE_TIMEOUT_MS = 10_000


def channel_options(
    *, max_message_bytes: int | None = MAX_MESSAGE_BYTES, retries: bool = True
) -> list[tuple[str, int]]:
    """Options for a client channel: keepalive, the message size cap, transparent retries."""
    ms = int(grpc_keepalive_s() * 1000)
    timeout_ms = min(KEEPALIVE_TIMEOUT_MS, ms)
    options = [
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # what gRPC core (1.85) actually waits for a ping's answer before closing the
        # connection; without it an unanswered keepalive ping waits a minute
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 0),  # an idle channel need not stay up
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging an open, quiet stream
    ]
    if max_message_bytes is not None:
        options += [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    if not retries:
        options.append(("grpc.enable_retries", 0))
    return options


def server_options(*, max_message_bytes: int | None = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for a server: accept the clients' keepalive pings; the message size cap."""
    ms = int(grpc_keepalive_s() * 1000)
    options = [
        ("grpc.http2.min_ping_interval_without_data_ms", ms // 2),
        ("grpc.http2.max_ping_strikes", 0),  # never GOAWAY a client for pinging
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if max_message_bytes is not None:
        options += [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    return options
