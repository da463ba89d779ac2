"""OpenAI-compatible request bodies, their checks, and the JSON the HTTP API answers with.

Owns: the pydantic models of ``/v1/completions`` and ``/v1/chat/completions`` bodies (unknown
fields are accepted and ignored, as OpenAI does), the refusal of options distserve does not
implement, the mapping of a body onto :class:`SamplingParams`, OpenAI-format errors, and the
response / stream-chunk dictionaries. It does not own HTTP, streaming or the router core
(``http_api.py``).

Accepted for the vLLM / SGLang benchmark clients: ``ignore_eos``, ``stream_options``,
``top_k``, ``stop_token_ids``, ``repetition_penalty`` = 1, ``logprobs`` absent/null/false,
``n`` = ``best_of`` = 1, zero ``frequency_penalty`` / ``presence_penalty``, ``echo`` false.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from distserve.engine.sampling_params import SamplingParams
from distserve.router.types import FrontChunk, Usage


class OpenAIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _GenerationBody(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None  # absent: the served model
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # wins over max_tokens when both are set
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    user: str | None = None  # the fairness key (client_id)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted only at their neutral values
    n: int | None = None
    best_of: int | None = None
    logprobs: bool | int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(_GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionBody(_GenerationBody):
    messages: list[ChatMessage]
    tools: list[Any] | None = None
    top_logprobs: int | None = None


def refuse_unsupported(body: _GenerationBody) -> None:
    """Raise :class:`OpenAIError` (400) for an option distserve does not implement."""
    neutral: list[tuple[str, object, tuple[object, ...], str]] = [
        ("n", body.n, (None, 1), "only n = 1 is supported"),
        ("best_of", body.best_of, (None, 1), "only best_of = 1 is supported"),
        ("frequency_penalty", body.frequency_penalty, (None, 0), "penalties are not supported"),
        ("presence_penalty", body.presence_penalty, (None, 0), "penalties are not supported"),
        ("repetition_penalty", body.repetition_penalty, (None, 1), "penalties are not supported"),
        ("logit_bias", body.logit_bias or None, (None,), "logit_bias is not supported"),
    ]
    if isinstance(body, CompletionBody):
        neutral += [
            ("echo", body.echo, (None, False), "echo is not supported"),
            ("suffix", body.suffix or None, (None,), "suffix is not supported"),
        ]
    if isinstance(body, ChatCompletionBody):
        neutral += [
            ("tools", body.tools or None, (None,), "tools are not supported"),
            ("top_logprobs", body.top_logprobs, (None, 0), "logprobs are not supported"),
        ]
    for param, value, allowed, why in neutral:
        if not any(value is a or (a is not None and value == a) for a in allowed):
            raise OpenAIError(f"{why} (got {param}={value!r})", param=param)
    if body.logprobs is not None and body.logprobs is not False:
        raise OpenAIError(f"logprobs are not supported (got {body.logprobs!r})", param="logprobs")


def completion_prompt(body: CompletionBody) -> str | list[int]:
    """The one prompt of a completions body: text or token ids."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise OpenAIError(
                f"batched prompts are not supported: send one prompt per request (got {len(prompt)})",
                param="prompt",
            )
        return prompt[0]  # type: ignore[return-value]
    return prompt  # type: ignore[return-value]


def chat_messages(body: ChatCompletionBody) -> list[dict[str, str]]:
    """Messages with their content flattened to text, as chat templates expect."""
    out = []
    for i, msg in enumerate(body.messages):
        if msg.content is None or isinstance(msg.content, str):
            text = msg.content or ""
        else:
            parts = []
            for part in msg.content:
                if part.type != "text" or part.text is None:
                    raise OpenAIError(
                        f"only text content parts are supported (got type {part.type!r})",
                        param=f"messages[{i}].content",
                    )
                parts.append(part.text)
            text = "".join(parts)
        out.append({"role": msg.role, "content": text})
    return out


def sampling_params(body: _GenerationBody, default_max_tokens: int) -> SamplingParams:
    """The body's sampling options; an invalid value becomes a 400 naming the field."""
    max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = body.max_tokens
    options: dict[str, Any] = {
        "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
        "stop": body.stop or (),
        "stop_token_ids": tuple(body.stop_token_ids or ()),
        "ignore_eos": body.ignore_eos,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "skip_special_tokens": body.skip_special_tokens,
        "seed": body.seed,
    }
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(body, name)
        if value is not None:
            options[name] = value
    try:
        return SamplingParams(**options)
    except ValueError as e:
        message = str(e)
        field = message.split(" ", 1)[0]
        param = field if field in options else None
        if param == "max_tokens" and body.max_completion_tokens is not None:
            param = "max_completion_tokens"
        raise OpenAIError(message, param=param) from None


# ---------------------------------------------------------------- responses


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class ResponseFormat:
    """Builds one endpoint's response objects (``chat`` or legacy completions)."""

    def __init__(self, *, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, text: str, finish_reason: str | None, *, first: bool = False) -> dict[str, Any]:
        """One stream event; ``first`` adds the chat role."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
            if text and not first:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        name = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(name, []), "usage": usage_dict(usage)}

    def response(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None}
            name = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
            name = "text_completion"
        choice["finish_reason"] = finish_reason
        return {**self._envelope(name, [choice]), "usage": usage_dict(usage)}


@dataclass
class Answer:
    """What the core streamed so far for one request, for the final response or usage."""

    texts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str = "stop"
    usage_from_core: Usage | None = None
    error: OpenAIError | None = None  # the core failed mid-answer
    is_disconnected: bool = False  # the client went away before the end

    def add(self, chunk: FrontChunk) -> None:
        self.texts.append(chunk.text)
        self.num_tokens += len(chunk.token_ids)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.usage_from_core = chunk.usage or self.usage_from_core

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def usage(self) -> Usage:
        return self.usage_from_core or Usage(completion_tokens=self.num_tokens)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def per_token_events(chunk: FrontChunk) -> list[tuple[str, str | None]]:
    """``(text, finish_reason)`` per event for one core chunk: one event per token, the chunk's
    text on its first token, its finish reason on its last event."""
    if not chunk.token_ids:
        if chunk.text or chunk.finish_reason:
            return [(chunk.text, chunk.finish_reason)]
        return []
    events: list[tuple[str, str | None]] = [("", None) for _ in chunk.token_ids]
    events[0] = (chunk.text, None)
    events[-1] = (events[-1][0], chunk.finish_reason)
    return events
