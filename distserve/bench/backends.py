"""How ``distserve bench`` sends one request and times it, per kind of endpoint.

    grpc://host:port      → GrpcBackend: distserve's own SDK (``distserve.client.AsyncClient``,
                            every request on one multiplexed ``GenerateStream``)
    http(s)://host[:port] → OpenAIBackend: any OpenAI-compatible server's streaming
                            ``/v1/completions`` (distserve's router, vLLM, SGLang,
                            ``transformers serve``), token-id or text prompts

Both fill a :class:`RequestRecord` from the arrival times of token-bearing events (over gRPC,
when the SDK read the message that carried the chunk); neither raises for a failed request (the
failure is recorded). ``describe()`` asks the endpoint what it
serves (model name, vocabulary size) where it can say.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from distserve.bench.prompts import BenchPrompt
from distserve.bench.records import RequestRecord
from distserve.client import AsyncClient, DistserveError


@dataclass(frozen=True)
class EndpointInfo:
    model_name: str | None
    vocab_size: int | None


class Backend(Protocol):
    async def describe(self) -> EndpointInfo: ...

    async def send(self, prompt: BenchPrompt) -> RequestRecord: ...

    async def close(self) -> None: ...


def pick_backend(endpoint: str, backend: str) -> str:
    """``grpc`` or ``openai`` for ``--backend auto`` from the endpoint's scheme."""
    if backend != "auto":
        return backend
    return "openai" if endpoint.startswith(("http://", "https://")) else "grpc"


class GrpcBackend:
    def __init__(self, endpoint: str, *, temperature: float, ignore_eos: bool, timeout_s: float):
        self.client = AsyncClient(endpoint, timeout_s=timeout_s)
        self.temperature = temperature
        self.ignore_eos = ignore_eos

    async def describe(self) -> EndpointInfo:
        info = await self.client.model_info()
        return EndpointInfo(info.model_name, info.vocab_size or None)

    async def send(self, prompt: BenchPrompt) -> RequestRecord:
        rec = RequestRecord(prompt.request_id, prompt.output_len, prompt.input_len)
        token_times: list[float] = []
        num_tokens = 0
        rec.send_s = time.perf_counter()
        try:
            async for chunk in self.client.stream(
                prompt.prompt,
                max_tokens=prompt.output_len,
                temperature=self.temperature,
                ignore_eos=self.ignore_eos,
                client_id=prompt.client_id,
            ):
                if chunk.token_ids:
                    token_times.append(chunk.arrival_s)
                    num_tokens += len(chunk.token_ids)
                if chunk.usage is not None:
                    rec.input_len = chunk.usage.prompt_tokens
                    num_tokens = chunk.usage.completion_tokens
        except DistserveError as e:
            rec.fail(f"{type(e).__name__}: {e.message}", time.perf_counter())
            return rec
        rec.finish(token_times, time.perf_counter(), num_tokens)
        return rec

    async def close(self) -> None:
        await self.client.close()


class OpenAIBackend:
    def __init__(
        self,
        endpoint: str,
        *,
        model: str | None,
        temperature: float,
        ignore_eos: bool,
        timeout_s: float,
        extra_body: dict[str, Any] | None = None,
    ):
        self.base_url = endpoint.rstrip("/").removesuffix("/v1")
        self.model = model
        self.temperature = temperature
        self.ignore_eos = ignore_eos
        self.extra_body = extra_body or {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits)

    async def describe(self) -> EndpointInfo:
        """The first model of ``/v1/models`` (and ``vocab_size`` where the server adds it);
        servers whose listing fails are asked nothing and get no ``model`` field."""
        try:
            resp = await self.http.get(f"{self.base_url}/v1/models")
            resp.raise_for_status()
            card = resp.json()["data"][0]
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            return EndpointInfo(self.model, None)
        if self.model is None:
            self.model = card.get("id")
        vocab = card.get("vocab_size")
        return EndpointInfo(self.model, int(vocab) if vocab else None)

    def _body(self, prompt: BenchPrompt) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt.prompt,
            "max_tokens": prompt.output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model is not None:
            body["model"] = self.model
        if self.ignore_eos:
            body["ignore_eos"] = True
        if prompt.client_id:
            body["user"] = prompt.client_id
        return {**body, **self.extra_body}

    async def send(self, prompt: BenchPrompt) -> RequestRecord:
        rec = RequestRecord(prompt.request_id, prompt.output_len, prompt.input_len)
        token_times: list[float] = []
        num_events = 0
        usage_tokens: int | None = None
        url = f"{self.base_url}/v1/completions"
        rec.send_s = time.perf_counter()
        try:
            async with self.http.stream("POST", url, json=self._body(prompt)) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    rec.fail(
                        f"HTTP {resp.status_code}: {_error_message(text)}", time.perf_counter()
                    )
                    return rec
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        rec.fail(f"stream error: {_error_message(data)}", time.perf_counter())
                        return rec
                    choices = event.get("choices") or []
                    if choices and choices[0].get("text"):
                        token_times.append(time.perf_counter())
                        num_events += 1
                    usage = event.get("usage")
                    if usage:
                        usage_tokens = usage.get("completion_tokens")
                        rec.input_len = usage.get("prompt_tokens", rec.input_len)
        except (httpx.HTTPError, ValueError) as e:
            rec.fail(f"{type(e).__name__}: {e}", time.perf_counter())
            return rec
        num_tokens = usage_tokens if usage_tokens is not None else num_events
        rec.finish(token_times, time.perf_counter(), num_tokens)
        return rec

    async def close(self) -> None:
        await self.http.aclose()


def _error_message(text: str) -> str:
    """The ``error.message`` (or FastAPI ``detail``) of an error body, else the body itself."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:200]
    if isinstance(body, dict):
        err = body.get("error", body.get("detail"))
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    return text.strip()[:200]
