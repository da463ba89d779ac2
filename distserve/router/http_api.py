"""The router's OpenAI-compatible HTTP API (FastAPI), in front of the router core.

    POST /v1/completions        prompt: text, [text], token ids or [token ids]
    POST /v1/chat/completions   messages → the tokenizer's chat template (generation prompt added)
    GET  /v1/models             the served model
    GET  /health                200 while the process serves
    GET  /metrics               Prometheus text of the RouterMetrics given (or made here)

Streaming answers are server-sent events, one generated token per event (a chunk of several
tokens from the core is split; its text rides on the first of them), ``finish_reason`` on the
last token's event, then a usage event with ``choices: []`` when
``stream_options.include_usage`` is set, then ``data: [DONE]``.

Errors are OpenAI-shaped JSON (``openai_protocol.OpenAIError``): 400 for bad or unsupported
input (never FastAPI's 422), 404 ``model_not_found``, 503 when the core raises ServiceError.
A client that disconnects — mid-stream or while waiting for a whole answer — gets its core
iterator closed, which aborts the request on the instances.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from distserve.router.metrics import CONTENT_TYPE, RouterMetrics
from distserve.router.openai_protocol import (
    Answer,
    ChatCompletionBody,
    CompletionBody,
    OpenAIError,
    ResponseFormat,
    chat_messages,
    completion_prompt,
    per_token_events,
    refuse_unsupported,
    sampling_params,
    sse,
)
from distserve.router.types import (
    FrontChunk,
    FrontRequest,
    InvalidRequestError,
    RouterFrontend,
    ServiceError,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint
_CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads this answer
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
_KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def build_http_app(
    frontend: RouterFrontend, *, metrics_registry: RouterMetrics | None = None
) -> FastAPI:
    """The HTTP app serving ``frontend``; ``metrics_registry`` is what ``/metrics`` shows and
    where HTTP request counts go (a fresh :class:`RouterMetrics` when None)."""
    metrics = metrics_registry or RouterMetrics(frontend.model_name)
    app = FastAPI(title="distserve", docs_url=None, redoc_url=None, openapi_url=None)

    def answer(request: Request, status: int, body: dict[str, Any]) -> JSONResponse:
        path = request.url.path
        metrics.count_http_request(path if path in _KNOWN_PATHS else "other", status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return answer(request, exc.status, exc.body())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(request, 400, _validation_body(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = OpenAIError(str(exc.detail), status=exc.status_code, code=str(exc.status_code))
        return answer(request, exc.status_code, err.body())

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        return answer(request, 200, {"status": "ok"})

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        metrics.count_http_request("/metrics", 200)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        card = {
            "id": frontend.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "distserve",
            "max_model_len": frontend.max_model_len,
            "vocab_size": len(frontend.tokenizer),  # not OpenAI's; lets bench send token ids
        }
        return answer(request, 200, {"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        _check_common(body, frontend)
        prompt = completion_prompt(body)
        params = sampling_params(body, DEFAULT_COMPLETION_MAX_TOKENS)
        front = FrontRequest(sampling_params=params, client_id=body.user or "")
        if isinstance(prompt, str):
            front.prompt_text = prompt
        else:
            front.prompt_token_ids = prompt
        return await _serve(request, frontend, front, body.stream, body.include_usage, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        _check_common(body, frontend)
        try:
            text = frontend.tokenizer.apply_chat_template(
                chat_messages(body), tokenize=False, add_generation_prompt=True
            )
            prompt_ids = list(frontend.tokenizer.encode(text, add_special_tokens=False))
        except OpenAIError:
            raise
        except Exception as e:  # the template's own complaint (e.g. roles must alternate)
            raise OpenAIError(f"cannot apply the chat template: {e}", param="messages") from e
        room = max(1, frontend.max_model_len - len(prompt_ids))
        params = sampling_params(body, room)
        front = FrontRequest(
            sampling_params=params, prompt_token_ids=prompt_ids, client_id=body.user or ""
        )
        return await _serve(request, frontend, front, body.stream, body.include_usage, chat=True)

    async def _serve(
        request: Request,
        frontend: RouterFrontend,
        front: FrontRequest,
        stream: bool,
        include_usage: bool,
        *,
        chat: bool,
    ) -> Response:
        chunks, first = await _start(request, frontend, front)
        if first is None:
            return Response(status_code=_CLIENT_CLOSED)
        fmt = ResponseFormat(chat=chat, request_id=first.request_id, model=frontend.model_name)
        if stream:
            metrics.count_http_request(request.url.path, 200)
            events = _sse_events(chunks, first, fmt, include_usage)
            return _SSEResponse(events)
        done = await _collect_unless_disconnected(request, chunks, first)
        if done.is_disconnected:
            return Response(status_code=_CLIENT_CLOSED)
        if done.error is not None:
            raise done.error
        return answer(request, 200, fmt.response(done.text, done.finish_reason, done.usage))

    return app


def _check_common(body: CompletionBody | ChatCompletionBody, frontend: RouterFrontend) -> None:
    if body.model is not None and body.model != frontend.model_name:
        raise OpenAIError(
            f"The model `{body.model}` does not exist; this server serves `{frontend.model_name}`.",
            status=404,
            param="model",
            code="model_not_found",
        )
    refuse_unsupported(body)


def _validation_body(exc: RequestValidationError) -> dict[str, Any]:
    """FastAPI's validation failure as a 400 OpenAI error naming the first bad field."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return OpenAIError("the request body is not valid JSON").body()
    param = _param_name(list(first.get("loc", ()))[1:])  # loc starts with "body"
    message = first.get("msg", "invalid request body")
    return OpenAIError(f"{param}: {message}" if param else message, param=param).body()


def _param_name(loc: list[int | str]) -> str | None:
    """``messages[0].content`` from pydantic's ``loc``, leaving out union-member tags such as
    ``str`` or ``list[int]`` that pydantic inserts after the field name."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_TAGS:
            name += f".{part}" if name else part
        else:
            break
    return name or None


def _core_error(e: Exception) -> OpenAIError:
    if isinstance(e, InvalidRequestError):
        return OpenAIError(str(e))
    return OpenAIError(
        str(e), status=503, code="service_unavailable", error_type="service_unavailable_error"
    )


async def _start(
    request: Request, frontend: RouterFrontend, front: FrontRequest
) -> tuple[AsyncIterator[FrontChunk], FrontChunk | None]:
    """Open the core's stream and wait for its first chunk, so that a refused request is still
    answered with an HTTP error status. None: the client left first (the stream is closed)."""
    chunks = frontend.generate(front)
    firsts: list[FrontChunk | None] = []

    async def take_first() -> None:
        firsts.append(await anext(chunks, None))

    try:
        is_gone = await _first_of(take_first(), _wait_for_disconnect(request.receive))
    except (InvalidRequestError, ServiceError) as e:
        raise _core_error(e) from e
    if is_gone:
        await _close(chunks)
        return chunks, None
    if firsts[0] is None:
        raise _core_error(ServiceError("the router ended the request without any output"))
    return chunks, firsts[0]


async def _close(chunks: AsyncIterator[FrontChunk]) -> None:
    """Close the core's stream: this is what aborts the request on the instances. (The core's
    ``generate`` is an async generator; a plain iterator without ``aclose`` has nothing to do.)"""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


async def _first_of(main: Awaitable[None], disconnect: Awaitable[None]) -> bool:
    """Run both until one ends, cancel the other; True when the client disconnected first.

    Plain asyncio cancellation is used on purpose: it is delivered once, so code that a
    cancelled core stream runs in its ``finally`` (aborting the request on the instances) can
    still await, unlike under an anyio cancel scope, which cancels every later await too."""
    main_task = asyncio.ensure_future(main)
    watch_task = asyncio.ensure_future(disconnect)
    try:
        await asyncio.wait({main_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (main_task, watch_task):
            task.cancel()
        await asyncio.gather(main_task, watch_task, return_exceptions=True)
    if not main_task.cancelled() and main_task.exception() is not None:
        raise main_task.exception()  # type: ignore[misc]
    return watch_task.done() and not watch_task.cancelled()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _collect_unless_disconnected(
    request: Request, chunks: AsyncIterator[FrontChunk], first: FrontChunk
) -> Answer:
    """Read the whole answer, or stop (and abort) as soon as the client goes away."""
    done = Answer()
    done.add(first)

    async def consume() -> None:
        try:
            async for chunk in chunks:
                done.add(chunk)
        except (InvalidRequestError, ServiceError) as e:
            done.error = _core_error(e)

    try:
        done.is_disconnected = await _first_of(consume(), _wait_for_disconnect(request.receive))
    finally:
        await _close(chunks)
    return done


async def _sse_events(
    chunks: AsyncIterator[FrontChunk], first: FrontChunk, fmt: ResponseFormat, include_usage: bool
) -> AsyncGenerator[str, None]:
    """The SSE events of one streamed answer, one generated token per event."""
    done = Answer()
    try:
        if fmt.chat:
            yield sse(fmt.chunk("", None, first=True))
        chunk: FrontChunk | None = first
        while chunk is not None:
            done.add(chunk)
            for text, finish in per_token_events(chunk):
                yield sse(fmt.chunk(text, finish))
            chunk = await anext(chunks, None)
        if include_usage:
            yield sse(fmt.usage_chunk(done.usage))
    except (InvalidRequestError, ServiceError) as e:
        yield sse(_core_error(e).body())
    finally:
        await _close(chunks)
    yield sse("[DONE]")


class _SSEResponse(StreamingResponse):
    """A streaming response that notices a disconnect at once (whatever the ASGI version) and
    always closes its events generator, which closes the core's stream (aborting the request)."""

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            with contextlib.suppress(OSError):  # the client went away while we were writing
                await self.stream_response(send)

        try:
            await _first_of(stream(), _wait_for_disconnect(receive))
        finally:
            await self.events.aclose()
