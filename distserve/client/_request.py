"""Building a ``GenerateRequest`` from the SDK's keyword arguments, and parsing endpoints.

Only what the caller sets is sent: an argument left at ``None`` takes the server's default.
Values are checked by the router (one source of truth); here only the prompt's type is checked.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def build_request(prompt: str | Sequence[int], **options: object) -> generation_pb2.GenerateRequest:
    """The request for ``prompt``; a value protobuf cannot hold (e.g. a negative count) raises
    :class:`InvalidRequest` before anything is sent."""
    try:
        return _build(prompt, **options)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"invalid request: {e}", code="INVALID_ARGUMENT") from e


def _build(
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
    sampling = generation_pb2.SamplingOptions(ignore_eos=ignore_eos)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if top_k is not None:
        sampling.top_k = top_k
    if seed is not None:
        sampling.seed = seed
    if stop is not None:
        sampling.stop.extend([stop] if isinstance(stop, str) else list(stop))
    if stop_token_ids is not None:
        sampling.stop_token_ids.extend(stop_token_ids)
    req = generation_pb2.GenerateRequest(
        request_id=request_id, client_id=client_id, sampling=sampling
    )
    if isinstance(prompt, str):
        req.text = prompt
    elif isinstance(prompt, Sequence) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        req.token_ids.ids.extend(prompt)
    else:
        raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    return req
