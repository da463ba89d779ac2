"""A fake ``RouterFrontend`` and a real uvicorn server on loopback (test helpers).

The fake core streams ``max_tokens`` tokens ``200 + i`` with text ``"w{i} "``, ``tokens_per_chunk``
per chunk, ``delay_s`` apart; the last chunk has finish ``"length"`` and usage with half the
prompt cached. Prompt text picks other behaviour: ``"invalid"`` → InvalidRequestError before any
output, ``"unavailable"`` → ServiceError, ``"endless"`` → tokens until the stream is closed,
``"fail-midway"`` → ServiceError after two chunks, ``"stalled"`` → no output for an hour. ``outcomes`` records, per request id, whether
the stream was ``"completed"`` or closed early (``"aborted"``) — closing is how a front end
aborts a request.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from distserve.router.types import (
    FrontChunk,
    FrontRequest,
    InvalidRequestError,
    ServiceError,
    Usage,
)


class FakeTokenizer:
    """One token per character; a ChatML-like template."""

    def __len__(self) -> int:
        return 1000

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        tokenize: bool = False,
        add_generation_prompt: bool = False,
    ) -> str:
        assert not tokenize
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeFrontend:
    model_name = "fake-model"
    max_model_len = 256

    def __init__(self, tokens_per_chunk: int = 1, delay_s: float = 0.001) -> None:
        self.tokenizer = FakeTokenizer()
        self.tokens_per_chunk = tokens_per_chunk
        self.delay_s = delay_s
        self.requests: list[FrontRequest] = []
        self.outcomes: dict[str, str] = {}

    async def generate(self, request: FrontRequest) -> AsyncIterator[FrontChunk]:
        self.requests.append(request)
        rid = request.request_id or f"fake-{len(self.requests)}"
        self.last_request_id = rid
        text = request.prompt_text
        if text == "invalid":
            raise InvalidRequestError("prompt: refused by the fake core")
        if text == "unavailable":
            raise ServiceError("no prefill instance is alive")
        prompt = self.tokenizer.encode(text) if text is not None else list(request.prompt_token_ids)
        num_tokens = 10**9 if text == "endless" else request.sampling_params.max_tokens
        usage = Usage(len(prompt), num_tokens, len(prompt) // 2)
        is_completed = False
        try:
            for start in range(0, num_tokens, self.tokens_per_chunk):
                await asyncio.sleep(3600 if text == "stalled" else self.delay_s)
                if text == "fail-midway" and start >= 2:
                    raise ServiceError("decode instance died")
                ids = list(range(start, min(start + self.tokens_per_chunk, num_tokens)))
                is_last = ids[-1] == num_tokens - 1
                yield FrontChunk(
                    request_id=rid,
                    token_ids=[200 + i for i in ids],
                    text="".join(f"w{i} " for i in ids),
                    finish_reason="length" if is_last else None,
                    usage=usage if is_last else None,
                    prefill_instance="prefill-0",
                    decode_instance="decode-0",
                )
            is_completed = True
        finally:
            self.outcomes[rid] = "completed" if is_completed else "aborted"

    def wait_for_outcome(self, rid: str, timeout_s: float = 5.0) -> str | None:
        deadline = time.monotonic() + timeout_s
        while rid not in self.outcomes and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.outcomes.get(rid)


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
