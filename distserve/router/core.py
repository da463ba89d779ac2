"""The router core: takes each request through prefill and decode (or one colocated instance).

    generate(FrontRequest)
      validate + tokenize ─▶ block hashes ─▶ policy.choose_prefill ─▶ prefill
        ─▶ first token (TTFT) ─▶ policy.choose_decode ─▶ decode ─▶ tokens
        ─▶ incremental detokenization + stop strings ─▶ FrontChunk stream

Prefill, decode and (colocated) generate go to an instance over the router's session with it
(``session.py``: one multiplexed stream per instance), each bounded by ``rpc_timeout_s``.

Failures: a prefill instance that is unreachable is retried on another one; bad input is
:class:`InvalidRequestError`; anything else that stops a request is :class:`ServiceError` with
what failed. Closing the stream early (client gone, stop string hit) aborts the request on the
instance serving it (an abort entry on the session), and releases a KV lease nobody will pull.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from distserve import timeline
from distserve._proto import instance_pb2
from distserve.engine.block_hash import block_hashes
from distserve.engine.detokenizer import IncrementalDetokenizer
from distserve.protocol import sampling_to_proto
from distserve.router.policies.base import RouteRequest, RoutingPolicy
from distserve.router.registry import InstanceRecord, InstanceRegistry
from distserve.router.session import SessionCallError
from distserve.router.types import (
    FrontChunk,
    FrontRequest,
    InvalidRequestError,
    ServiceError,
    Usage,
)

logger = logging.getLogger(__name__)

# Text the fast-path codec must encode and decode exactly as the tokenizer does before it is used.
_CODEC_PROBES = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnew lines  ",
    "caf\u00e9 na\u00efve \u00fcber \u4f60\u597d \U0001f600 \u2014 1234567890",
)


class _Codec:
    """The router's tokenizer calls, made on a fast tokenizer's Rust backend where that is exact.

    A Hugging Face tokenizer's ``encode``/``decode`` wrap the Rust ``tokenizers`` backend in
    per-call argument handling (``BatchEncoding``, truncation and padding set-up, length checks)
    that costs more than tokenizing a short prompt, twice per request on the request path. For
    the calls the router makes (plain text to ids without special tokens; ids to text without
    clean-up of spaces) the wrapper adds nothing, so they go to the backend directly. The
    tokenizer is still called where that is not certain (no backend, clean-up of spaces on) and
    probes at start-up must give identical results both ways, or every call goes to the tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            self._backend = backend
            if not self._agrees():
                logger.info("tokenizer backend differs from the tokenizer; not using it")
                self._backend = None

    def _agrees(self) -> bool:
        special = list(getattr(self.tokenizer, "all_special_tokens", ()))
        for text in (*_CODEC_PROBES, " ".join([*special, *_CODEC_PROBES[:1]])):
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if self.encode(text) != list(ids):
                return False
            for skip in (False, True):
                for part in (ids, ids[:3], ids[-2:]):
                    expect = self.tokenizer.decode(part, skip_special_tokens=skip)
                    if self.decode(part, skip_special_tokens=skip) != expect:
                        return False
        return True

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (``tokenizer.encode(text, False)``)."""
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """What ``tokenizer.decode(ids, skip_special_tokens=...)`` returns."""
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class RouterCore:
    def __init__(
        self,
        *,
        model_name: str,
        tokenizer: Any,
        vocab_size: int,
        max_model_len: int,
        registry: InstanceRegistry,
        policy: RoutingPolicy,
        metrics: Any = None,
        instance_wait_s: float = 60.0,
        rpc_timeout_s: float = 600.0,
    ) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self._codec = _Codec(tokenizer)
        self.vocab_size = vocab_size
        self._max_model_len = max_model_len
        self.registry = registry
        self.policy = policy
        self.metrics = metrics
        self.instance_wait_s = instance_wait_s
        self.rpc_timeout_s = rpc_timeout_s

    @property
    def max_model_len(self) -> int:
        lens = [r.descriptor.max_model_len for r in self.registry.instances.values()]
        return min([self._max_model_len, *lens])

    @property
    def block_size(self) -> int:
        layout = self.registry.layout
        return layout.block_size if layout is not None else 16

    # ---- validation ----------------------------------------------------------------------
    def prompt_ids(self, request: FrontRequest) -> list[int]:
        if (request.prompt_text is None) == (request.prompt_token_ids is None):
            raise InvalidRequestError("give exactly one of a text prompt or prompt token ids")
        if request.prompt_text is not None:
            ids = self._codec.encode(request.prompt_text)
        else:
            ids = list(request.prompt_token_ids or ())
            bad = next(
                (t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None
            )
            if bad is not None:
                raise InvalidRequestError(
                    f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})"
                )
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len} tokens "
                "(prompt + at least one new token)"
            )
        return ids

    async def _instances(self, role: str) -> list[InstanceRecord]:
        deadline = time.monotonic() + self.instance_wait_s
        while True:
            records = self.registry.by_role(role)
            if records:
                return records
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceError(f"no {role} instance is registered with the router")
            self.registry.changed.clear()
            try:
                await asyncio.wait_for(self.registry.changed.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                pass

    def _mode(self) -> str:
        if self.registry.by_role("prefill") or self.registry.by_role("decode"):
            return "disaggregated"
        if self.registry.by_role("colocated"):
            return "colocated"
        return "disaggregated"

    # ---- the request path ----------------------------------------------------------------
    async def generate(self, request: FrontRequest) -> AsyncIterator[FrontChunk]:
        ids = self.prompt_ids(request)
        params = request.sampling_params
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        route = RouteRequest(
            request_id=rid,
            client_id=request.client_id,
            num_prompt_tokens=len(ids),
            block_hashes=tuple(block_hashes(ids, self.block_size)),
            block_size=self.block_size,
            expected_output_tokens=params.max_tokens,
            arrival_s=time.monotonic(),
        )
        engine_request = instance_pb2.EngineRequest(
            request_id=rid,
            client_id=request.client_id,
            prompt_token_ids=ids,
            sampling=sampling_to_proto(params),
        )
        detok = IncrementalDetokenizer(
            self._codec,
            params.stop,
            params.include_stop_str_in_output,
            params.skip_special_tokens,
        )
        run = _Run(self, rid, route, engine_request, detok, len(ids))
        timeline.mark(rid, "router.recv")
        stream = run.colocated() if self._mode() == "colocated" else run.disaggregated()
        finish_reason = None
        try:
            async for chunk in stream:
                run.token_times.extend([time.monotonic()] * bool(chunk.token_ids))
                finish_reason = chunk.finish_reason or finish_reason
                yield chunk
        except InvalidRequestError:
            self._count_error("invalid")
            raise
        except ServiceError:
            self._count_error("unavailable")
            raise
        finally:
            await stream.aclose()
            if run.routed:
                self.policy.on_finished(rid, time.monotonic())
            self._observe(run, finish_reason or "abort")

    def _count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.count_error(kind)

    def _observe(self, run: _Run, finish_reason: str) -> None:
        if self.metrics is None:
            return
        times = run.token_times
        if run.prefill_id:
            self.metrics.count_route(self.policy.name, run.prefill_id)
        if run.decode_id and run.decode_id != run.prefill_id:
            self.metrics.count_route(self.policy.name, run.decode_id)
        if run.transfer_s is not None:
            self.metrics.observe_transfer(run.transfer_bytes, run.transfer_s)
        n = run.usage.completion_tokens
        self.metrics.observe_request(
            times[0] - run.start_s if times else None,
            (times[-1] - times[0]) / (n - 1) if times and n > 1 else None,
            time.monotonic() - run.start_s,
            [b - a for a, b in itertools.pairwise(times)],
            finish_reason,
            num_prompt_tokens=run.usage.prompt_tokens,
            num_completion_tokens=n,
            num_cached_tokens=run.usage.cached_tokens,
        )


class _Run:
    """One request's trip through the cluster (state shared by its steps)."""

    def __init__(
        self,
        core: RouterCore,
        rid: str,
        route: RouteRequest,
        engine_request: instance_pb2.EngineRequest,
        detok: IncrementalDetokenizer,
        num_prompt_tokens: int,
    ) -> None:
        self.core = core
        self.rid = rid
        self.route = route
        self.req = engine_request
        self.detok = detok
        self.usage = Usage(prompt_tokens=num_prompt_tokens)
        self.routed = False
        self.prefill_id = ""
        self.decode_id = ""
        self.start_s = time.monotonic()
        self.token_times: list[float] = []  # arrival of each chunk that carried tokens
        self.transfer_s: float | None = None  # the decode instance's KV pull time
        self.transfer_bytes = 0

    def _chunk(
        self, token_ids: list[int], final: bool, finish_reason: str | None
    ) -> tuple[FrontChunk, bool]:
        """Detokenize new tokens; returns the chunk and whether a stop string ended the request."""
        self.usage.completion_tokens += len(token_ids)
        delta = self.detok.add(token_ids, final=final or finish_reason is not None)
        stopped = delta.stopped and finish_reason is None
        reason = "stop" if stopped else finish_reason
        chunk = FrontChunk(
            request_id=self.rid,
            token_ids=list(token_ids),
            text=delta.text,
            finish_reason=reason,
            usage=self.usage if reason else None,
            prefill_instance=self.prefill_id,
            decode_instance=self.decode_id,
        )
        return chunk, stopped

    async def _prefill(self) -> instance_pb2.PrefillResponse:
        core = self.core
        tried: set[str] = set()
        while True:
            records = [r for r in await core._instances("prefill") if r.instance_id not in tried]
            if not records:
                raise ServiceError(f"every prefill instance failed for request {self.rid}")
            if self.routed:
                core.policy.on_finished(self.rid, time.monotonic())
            chosen = core.policy.choose_prefill(
                self.route, [r.load() for r in records], time.monotonic()
            )
            self.routed = True
            record = core.registry.instances[chosen]
            self.prefill_id = chosen
            try:
                timeline.mark(self.rid, "router.prefill_sent")
                return await record.session.prefill(self.req, core.rpc_timeout_s)
            except SessionCallError as exc:
                _raise_invalid(exc)
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise ServiceError(
                        f"prefill on {chosen} failed: {exc.code().name}: {exc.details()}"
                    ) from None
                logger.warning(
                    "prefill instance %s unavailable (%s); retrying elsewhere",
                    chosen,
                    exc.details(),
                )
                tried.add(chosen)

    async def disaggregated(self) -> AsyncIterator[FrontChunk]:
        core = self.core
        start = time.monotonic()
        prefill = await self._prefill()
        timeline.mark(self.rid, "router.prefill_done")
        core.policy.on_prefill_done(self.rid, time.monotonic(), time.monotonic() - start)
        self.usage.cached_tokens = prefill.num_cached_tokens
        chunk, stopped = self._chunk([prefill.first_token_id], False, prefill.finish_reason or None)
        if chunk.finish_reason:
            if stopped:
                await self._release(prefill.kv)
            yield chunk
            return
        try:
            decodes = await core._instances("decode")
        except ServiceError:
            await self._release(prefill.kv)
            raise
        timeline.mark(self.rid, "router.first_out")
        yield chunk
        chosen = core.policy.choose_decode(
            self.route, [r.load() for r in decodes], time.monotonic()
        )
        self.decode_id = chosen
        record = core.registry.instances[chosen]
        chunks = record.session.decode(
            instance_pb2.DecodeRequest(
                request=self.req, first_token_id=prefill.first_token_id, kv=prefill.kv
            ),
            core.rpc_timeout_s,
        )
        async for chunk in self._stream(chunks, f"decode on {chosen}"):
            yield chunk

    async def colocated(self) -> AsyncIterator[FrontChunk]:
        core = self.core
        records = await core._instances("colocated")
        chosen = core.policy.choose_prefill(
            self.route, [r.load() for r in records], time.monotonic()
        )
        self.routed = True
        self.prefill_id = self.decode_id = chosen
        chunks = core.registry.instances[chosen].session.generate(self.req, core.rpc_timeout_s)
        first = True
        async for chunk in self._stream(chunks, f"generation on {chosen}"):
            if first:
                core.policy.on_prefill_done(self.rid, time.monotonic())
                first = False
            yield chunk

    async def _stream(
        self, chunks: AsyncIterator[instance_pb2.TokenChunk], what: str
    ) -> AsyncIterator[FrontChunk]:
        """Relay an instance's token stream; abort it on a stop string or an early close."""
        try:
            async for msg in chunks:
                if msg.num_cached_tokens:
                    self.usage.cached_tokens = msg.num_cached_tokens
                if msg.transfer_bytes:
                    self.transfer_s, self.transfer_bytes = msg.transfer_s, msg.transfer_bytes
                if not msg.token_ids and not msg.finish_reason:
                    continue
                chunk, _ = self._chunk(list(msg.token_ids), False, msg.finish_reason or None)
                yield chunk
                if chunk.finish_reason is not None:
                    return
            raise ServiceError(f"{what} ended without a finish reason")
        except SessionCallError as exc:
            _raise_invalid(exc)
            raise ServiceError(f"{what} failed: {exc.code().name}: {exc.details()}") from None
        finally:
            # A no-op when the stream ended; otherwise (stop string, client gone) the session
            # sends an abort entry and the instance aborts the request, freeing its blocks.
            await chunks.aclose()  # type: ignore[attr-defined]

    async def _release(self, kv: instance_pb2.KVHandle) -> None:
        record = self.core.registry.instances.get(kv.instance_id)
        if record is None or not kv.transfer_id:
            return
        try:
            await record.stub.ReleaseKV(
                instance_pb2.ReleaseKVRequest(transfer_id=kv.transfer_id), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            logger.debug("ReleaseKV %s failed: %s", kv.transfer_id, exc.details())


def _raise_invalid(exc: SessionCallError) -> None:
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        raise InvalidRequestError(exc.details()) from None
