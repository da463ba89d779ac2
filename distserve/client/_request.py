"""Building a ``GenerateRequest`` from the SDK's keyword arguments, and parsing endpoints.

Only what the caller sets is sent: an argument left at ``None`` takes the server's default.
Values are checked by the router (one source of truth); here only the prompt's type is checked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from distserve._proto import generation_pb2
from distserve.client.errors import InvalidRequest

DEFAULT_ENDPOINT = "127.0.0.1:50051"


def normalize_endpoint(endpoint: str) -> str:
    """``host:port`` for gRPC from ``host:port`` or ``grpc://host:port``."""
    target = endpoint.strip()
    if target.startswith("grpc://"):
        target = target[len("grpc://") :]
    target = target.rstrip("/")
    if not target or target.startswith(("http://", "https://")):
        raise ValueError(f"endpoint must be host:port or grpc://host:port, got {endpoint!r}")
    return target


def build_request(
    prompt: str | Sequence[int],
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    client_id: str = "",
    request_id: str = "",
) -> generation_pb2.GenerateRequest:
    """The request for ``prompt``. A value protobuf cannot hold (a negative count, a wrong type)
    raises :class:`InvalidRequest` naming the field, before anything is sent."""
    sampling = generation_pb2.SamplingOptions()
    scalars = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "ignore_eos": ignore_eos,
    }
    lists = {
        "stop": [stop] if isinstance(stop, str) else stop,
        "stop_token_ids": stop_token_ids,
    }
    for name, value in scalars.items():
        if value is not None:
            _checked(name, setattr, sampling, name, value)
    for name, values in lists.items():
        if values is not None:
            _checked(name, getattr(sampling, name).extend, list(values))
    req = generation_pb2.GenerateRequest(sampling=sampling)
    _checked("client_id", setattr, req, "client_id", client_id)
    _checked("request_id", setattr, req, "request_id", request_id)
    if isinstance(prompt, str):
        req.text = prompt
    elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
        _checked("prompt token ids", req.token_ids.ids.extend, list(prompt))
    else:
        raise InvalidRequest(
            f"prompt must be a str or a list of token ids, got {type(prompt).__name__}",
            code="INVALID_ARGUMENT",
        )
    return req


def _checked(name: str, assign: Callable[..., object], *args: object) -> None:
    """``assign(*args)``, turning protobuf's complaint into an error that names the field."""
    try:
        assign(*args)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"{name}: {e}", code="INVALID_ARGUMENT") from None
