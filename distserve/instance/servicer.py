"""The ``Instance`` gRPC service of one instance's driver: requests in, tokens out, KV pulls.

Handlers run on the asyncio loop and reach the engine only through :class:`EngineLoop`. The
request logic (``prefill``, ``decode``, ``generate``) is written once and served two ways
(``instance/session.py``): by the per-request RPCs and by the router's ``Session`` stream. Bad
input is ``INVALID_ARGUMENT``; a call for another role is ``FAILED_PRECONDITION``; a request
that fails inside (KV transfer, engine failure) ends with ``UNAVAILABLE``. A caller that goes
away (a cancelled RPC, an ``abort`` entry on a session, a session that ends) aborts its request
here, freeing its blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from distserve._proto import instance_pb2
from distserve.instance.engine_loop import EngineLoop, StreamItem
from distserve.instance.roles import DecodeRole, PrefillDone, PrefillRole, PullInfo, TransferStats
from distserve.instance.session import CallError, RequestRPCs, call_error
from distserve.protocol import layout_mismatch, sampling_from_proto
from distserve.rpc.multiplex import unary_call
from distserve.transfer import TransferDescriptor

logger = logging.getLogger(__name__)


class InstanceServicer(RequestRPCs):
    def __init__(
        self,
        loop: EngineLoop,
        instance_id: str,
        role: str,
        address: str,
        ranks: tuple[int, ...],
        layout: instance_pb2.KVLayout,
        stats: Callable[[], instance_pb2.InstanceStats],
    ) -> None:
        self.loop = loop
        self.engine = loop.engine
        self.handler = loop.role
        self.instance_id = instance_id
        self.role = role
        self.address = address
        self.ranks = ranks
        self.layout = layout
        self._stats = stats
        # Set when the instance starts shutting down: new requests (on a Session stream that is
        # still open during the server's grace period, too) get UNAVAILABLE, so the router
        # retries a prefill elsewhere; the requests already admitted finish.
        self.draining = False

    # ---- helpers -------------------------------------------------------------------------
    def _require_role(self, *roles: str) -> None:
        if self.role not in roles:
            raise CallError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{self.instance_id} is a {self.role} instance"
            )

    async def _admit(self, request_id: str, add: Callable[[], Any]) -> asyncio.Queue:
        if not request_id:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        if self.draining:
            raise CallError(grpc.StatusCode.UNAVAILABLE, f"{self.instance_id} is shutting down")
        stream = self.loop.open_stream(request_id)
        try:
            await self.loop.call(add)
        except (ValueError, RuntimeError) as exc:
            self.loop.close_stream(request_id)
            raise call_error(exc) from None
        return stream

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await asyncio.shield(self.loop.call(lambda: self.handler.abort(request_id)))
        except Exception:  # the engine loop may be gone at shutdown
            logger.debug("abort of %s failed", request_id, exc_info=True)

    async def _stream_tokens(
        self, request_id: str, stream: asyncio.Queue[StreamItem]
    ) -> AsyncIterator[instance_pb2.TokenChunk]:
        """One message per engine step's tokens; when this handler fell behind (several steps'
        items already queued), their tokens go out together in one message."""
        finished = False
        try:
            chunk = instance_pb2.TokenChunk(request_id=request_id)
            while not finished:
                items = [await stream.get()]
                while not stream.empty():
                    items.append(stream.get_nowait())
                has_tokens = False  # the chunk holds items to send
                for item in items:
                    if item.error:
                        if has_tokens:
                            yield chunk
                        finished = True
                        raise CallError(grpc.StatusCode.UNAVAILABLE, item.error)
                    if isinstance(item.payload, TransferStats):
                        chunk.transfer_s = item.payload.elapsed_s
                        chunk.transfer_bytes = item.payload.num_bytes
                        continue
                    chunk.token_ids.extend(item.token_ids)
                    if item.num_cached_tokens:
                        chunk.num_cached_tokens = item.num_cached_tokens
                    has_tokens = True
                    if item.finish_reason:
                        chunk.finish_reason = item.finish_reason
                        finished = True
                        break
                if has_tokens:
                    yield chunk
                    chunk = instance_pb2.TokenChunk(request_id=request_id)
        finally:
            self.loop.close_stream(request_id)
            if not finished:
                await self._abort_quietly(request_id)

    # ---- request logic (raises CallError) ------------------------------------------------
    async def prefill(self, request: instance_pb2.EngineRequest) -> instance_pb2.PrefillResponse:
        self._require_role("prefill")
        params = _params(request)
        rid = request.request_id
        ids = list(request.prompt_token_ids)
        stream = await self._admit(
            rid, lambda: self.engine.add_request(rid, ids, params, request.client_id)
        )
        done = False
        try:
            item = await stream.get()
            done = True
            if item.error:
                raise CallError(grpc.StatusCode.UNAVAILABLE, item.error)
            response = instance_pb2.PrefillResponse(
                request_id=rid,
                first_token_id=item.token_ids[0],
                num_cached_tokens=item.num_cached_tokens,
            )
            if item.finish_reason:
                response.finish_reason = item.finish_reason
                return response
            kv: PrefillDone = item.payload
            response.kv.CopyFrom(
                instance_pb2.KVHandle(
                    instance_id=self.instance_id,
                    address=self.address,
                    transfer_id=kv.transfer_id,
                    num_blocks=kv.num_blocks,
                    num_tokens=kv.num_tokens,
                    src_ranks=list(self.ranks),
                    layout=self.layout,
                )
            )
            return response
        finally:
            self.loop.close_stream(rid)
            if not done:
                await self._abort_quietly(rid)

    async def decode(
        self, request: instance_pb2.DecodeRequest
    ) -> AsyncIterator[instance_pb2.TokenChunk]:
        self._require_role("decode")
        inner = request.request
        params = _params(inner)
        kv = request.kv
        mismatch = layout_mismatch(self.layout, kv.layout)
        if mismatch:
            raise CallError(
                grpc.StatusCode.FAILED_PRECONDITION, f"KV layout of {kv.instance_id}: {mismatch}"
            )
        rid = inner.request_id
        info = PullInfo(kv.transfer_id, kv.num_blocks, tuple(kv.src_ranks), kv.address)
        role: DecodeRole = self.handler  # type: ignore[assignment]

        def add() -> None:
            expected = self.engine.kv.num_blocks_needed(len(inner.prompt_token_ids))
            if kv.num_blocks != expected:
                raise ValueError(
                    f"KV handle has {kv.num_blocks} blocks for a {len(inner.prompt_token_ids)}-token prompt"
                )
            self.engine.add_transferred_request(
                rid, list(inner.prompt_token_ids), request.first_token_id, params, inner.client_id
            )
            role.add(rid, info)

        stream = await self._admit(rid, add)
        async for chunk in self._stream_tokens(rid, stream):
            yield chunk

    async def generate(
        self, request: instance_pb2.EngineRequest
    ) -> AsyncIterator[instance_pb2.TokenChunk]:
        self._require_role("colocated")
        params = _params(request)
        rid = request.request_id
        ids = list(request.prompt_token_ids)
        stream = await self._admit(
            rid, lambda: self.engine.add_request(rid, ids, params, request.client_id)
        )
        async for chunk in self._stream_tokens(rid, stream):
            yield chunk

    # ---- requests: per-request RPCs and the router's session ------------------------------
    async def Abort(
        self, request: instance_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> instance_pb2.AbortResponse:
        found = await self.loop.call(lambda: self.handler.abort(request.request_id))
        return instance_pb2.AbortResponse(found=bool(found))

    async def GetStats(
        self, request: instance_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> instance_pb2.InstanceStats:
        return await self.loop.call(self._stats)

    # ---- KV pulls (prefill side) ---------------------------------------------------------
    async def PullKV(
        self, request: instance_pb2.PullKVRequest, context: grpc.aio.ServicerContext
    ) -> instance_pb2.PullKVResponse:
        return await unary_call(self._pull_kv(request), context)

    async def _pull_kv(self, request: instance_pb2.PullKVRequest) -> instance_pb2.PullKVResponse:
        self._require_role("prefill")
        try:
            desc = TransferDescriptor(
                transfer_id=request.transfer_id,
                seq_no=request.seq_no,
                num_blocks=request.num_blocks,
                src_ranks=self.ranks,
                dst_ranks=tuple(request.dst_ranks),
                spec=self.engine.kv_spec,
            )
        except ValueError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        role: PrefillRole = self.handler  # type: ignore[assignment]
        try:
            await self.loop.call(lambda: role.pull(desc))
        except ValueError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return instance_pb2.PullKVResponse()

    async def ReleaseKV(
        self, request: instance_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext
    ) -> instance_pb2.ReleaseKVResponse:
        return await unary_call(self._release_kv(request), context)

    async def _release_kv(
        self, request: instance_pb2.ReleaseKVRequest
    ) -> instance_pb2.ReleaseKVResponse:
        self._require_role("prefill")
        role: PrefillRole = self.handler  # type: ignore[assignment]
        found = await self.loop.call(lambda: role.release(request.transfer_id))
        return instance_pb2.ReleaseKVResponse(found=bool(found))


def _params(request: instance_pb2.EngineRequest) -> Any:
    try:
        return sampling_from_proto(request.sampling)
    except ValueError as exc:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
