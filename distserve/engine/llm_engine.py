"""The engine: one instance's loop of schedule → execute → sample → update.

    add_request ──▶ Scheduler.waiting ──▶ step(): schedule ─▶ build inputs ─▶ run model ─▶ sample ─▶ update
                                                                                         └▶ EngineOutput per sampled token

The engine works in token ids: it does not detokenize nor apply stop strings (the ``LLM`` front
and the router do, with the same :class:`IncrementalDetokenizer`), so the same engine serves the
offline API and every instance role.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from distserve import timeline
from distserve.config import EngineConfig
from distserve.engine.executor import (
    Executor,
    UniprocExecutor,
    cpu_threads_per_rank,
    spawn_group,
)
from distserve.engine.kv_manager import KVCacheManager
from distserve.engine.request import Request, RequestStatus, TokenLogprobs
from distserve.engine.role_schedulers import SCHEDULERS, DecodeScheduler
from distserve.engine.sampler import sample
from distserve.engine.sampling_params import SamplingParams
from distserve.engine.scheduler import Scheduler
from distserve.engine.step_inputs import build_step_inputs
from distserve.engine.worker import RankCommand, TransferOp, WorkerSpec
from distserve.model.config import ModelConfig
from distserve.model.parallel import check_pipeline_parallel_size, stage_layer_range

logger = logging.getLogger(__name__)


@dataclass
class EngineOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    num_cached_tokens: int = 0  # prompt tokens that were served from the prefix cache


@dataclass
class InstanceTransferResult:
    """A KV transfer as seen by the whole instance: over once every rank reported it."""

    transfer_id: str
    ok: bool
    num_bytes: int  # summed over this instance's ranks
    elapsed_s: float  # the slowest rank's time
    error: str | None = None


@dataclass
class _TransferTally:
    ranks_left: int
    num_bytes: int = 0
    elapsed_s: float = 0.0
    error: str | None = None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str, model_config: ModelConfig) -> str:
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "float32"  # CPU matmuls in bf16/fp16 are slow and less exact
    checkpoint = str(model_config.torch_dtype).replace("torch.", "")
    return checkpoint if checkpoint in ("bfloat16", "float16") else "bfloat16"


def _estimate_weight_bytes(mc: ModelConfig, dtype_bytes: int) -> int:
    """Weight bytes of a decoder from its shapes (enough to size the KV pool on a GPU)."""
    h, q, kv = mc.hidden_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    inter = getattr(mc.hf_config, "intermediate_size", 4 * h)
    per_layer = h * (2 * q + 2 * kv) + 3 * h * inter
    return (mc.num_layers * per_layer + 2 * mc.vocab_size * h) * dtype_bytes


class LLMEngine:
    """One instance's engine. ``role`` picks the scheduler: colocated, prefill or decode.

    ``executor`` may be given by a launcher whose ranks already exist (torchrun); by default the
    engine builds its own (one process, or spawned TP/PP ranks).
    """

    def __init__(
        self,
        config: EngineConfig,
        role: str = "colocated",
        executor_factory: object | None = None,
    ) -> None:
        if role not in SCHEDULERS:
            raise ValueError(f"role must be one of {sorted(SCHEDULERS)}, got {role!r}")
        self.config = config
        self.role = role
        from transformers import AutoTokenizer

        self.model_config = ModelConfig.from_pretrained(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, self.model_config)
        tp_size = config.parallel.tensor_parallel_size
        pp_size = config.parallel.pipeline_parallel_size
        check_pipeline_parallel_size(self.model_config.num_layers, pp_size)
        world_size = tp_size * pp_size
        cache = config.cache
        self.kv_spec = self.model_config.kv_spec(cache.block_size, self.dtype)
        num_blocks = cache.num_blocks or self._blocks_for_memory(tp_size, pp_size)
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
            num_blocks * cache.block_size,
        )
        num_threads = config.num_threads
        if num_threads is None and self.device == "cpu" and world_size > 1:
            num_threads = cpu_threads_per_rank(world_size)
        spec = WorkerSpec(
            model_path=str(config.model),
            dtype=self.dtype,
            device=self.device,
            num_blocks=num_blocks,
            block_size=cache.block_size,
            attention_backend=config.attention_backend,
            num_threads=num_threads,
        )
        self.worker_spec = spec
        if callable(executor_factory):
            self.executor: Executor = executor_factory(spec)
        elif world_size > 1:
            self.executor = spawn_group(spec, tp_size, pp_size)
        else:
            self.executor = UniprocExecutor(spec)
        self.tp_size = tp_size
        self.pp_size = pp_size
        self.world_size = world_size  # ranks of this instance
        self.num_blocks = num_blocks
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler: Scheduler = SCHEDULERS[role](config.scheduler, self.kv)
        self._transfer_ops: list[TransferOp] = []
        self._transfers: dict[str, _TransferTally] = {}
        self._transfer_results: list[InstanceTransferResult] = []
        self.last_step_was_idle = False  # the last step() found nothing it could run
        self.on_request_done: Callable[[Request], None] | None = (
            None  # metrics hook: finished or prefilled
        )
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(config.seed)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        logger.info(
            "engine ready: %s on %s (%s), TP=%d, PP=%d, %d KV blocks of %d tokens, max_model_len=%d",
            config.model,
            self.device,
            self.dtype,
            tp_size,
            pp_size,
            num_blocks,
            cache.block_size,
            self.max_model_len,
        )

    def _blocks_for_memory(self, tp_size: int, pp_size: int = 1) -> int:
        # A rank holds its stage's layers only; the first stage has the most (remainder first).
        start, end = stage_layer_range(self.kv_spec.num_layers, pp_size, 0)
        block_bytes = self.kv_spec.block_bytes(tp_size) * (end - start) // self.kv_spec.num_layers
        if self.device == "cpu":
            budget = self.config.cache.cpu_memory_gib * 2**30
        else:
            free, _total = torch.cuda.mem_get_info(torch.device(self.device))
            weights = (
                1.2
                * _estimate_weight_bytes(self.model_config, self.kv_spec.dtype_bytes)
                / (tp_size * pp_size)
            )
            budget = max(0.0, free * self.config.cache.gpu_memory_utilization - weights)
        num_blocks = int(budget // block_bytes)
        if num_blocks < 1:
            raise ValueError(
                "not enough memory for a single KV block; raise the cache memory settings"
            )
        return num_blocks

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        client_id: str = "",
        arrival_s: float | None = None,
    ) -> Request:
        request = self._new_request(request_id, prompt_token_ids, params, client_id, arrival_s)
        self.scheduler.add(request)
        timeline.mark(request_id, "engine.admitted")
        return request

    def add_transferred_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        first_token_id: int,
        params: SamplingParams,
        client_id: str = "",
    ) -> Request:
        """Decode role: a request prefilled elsewhere; its KV is pulled when there is room."""
        if not isinstance(self.scheduler, DecodeScheduler):
            raise RuntimeError(f"a {self.role} engine does not take prefilled requests")
        request = self._new_request(request_id, prompt_token_ids, params, client_id, None)
        request.output_token_ids.append(first_token_id)
        request.first_token_s = time.monotonic()
        self.scheduler.add_awaiting_kv(request)
        return request

    def _new_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        client_id: str,
        arrival_s: float | None,
    ) -> Request:
        self.validate_prompt(prompt_token_ids)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            client_id=client_id,
            arrival_s=time.monotonic() if arrival_s is None else arrival_s,
        )
        if request.generator is None and not params.is_greedy:
            request.generator = torch.Generator().manual_seed(self._rng.randrange(2**63))
        self.requests[request_id] = request
        return request

    def validate_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next(
            (t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None
        )
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens; this engine's max_model_len is "
                f"{self.max_model_len} (prompt + at least one new token)"
            )

    def abort(self, request_id: str) -> bool:
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_id: str, status: RequestStatus) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish(request, status)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- KV transfers (prefill and decode roles) ------------------------------------------
    def queue_transfer_op(self, op: TransferOp) -> None:
        """Have every rank start ``op`` at the next step (cancels need no tracking of their own)."""
        self._transfer_ops.append(op)
        if op.kind != "cancel":
            self._transfers[op.transfer_id] = _TransferTally(ranks_left=self.world_size)

    @property
    def has_pending_ops(self) -> bool:
        return bool(self._transfer_ops)

    @property
    def num_transfers_in_flight(self) -> int:
        return len(self._transfers)

    def drain_transfer_results(self) -> list[InstanceTransferResult]:
        out, self._transfer_results = self._transfer_results, []
        return out

    def _tally(self, per_rank: list[list]) -> None:
        for results in per_rank:
            for result in results:
                tally = self._transfers.get(result.transfer_id)
                if tally is None:
                    continue
                tally.ranks_left -= 1
                tally.num_bytes += result.num_bytes
                tally.elapsed_s = max(tally.elapsed_s, result.elapsed_s)
                if not result.is_ok and tally.error is None:
                    tally.error = result.error or result.state.value
                if tally.ranks_left == 0:
                    del self._transfers[result.transfer_id]
                    self._transfer_results.append(
                        InstanceTransferResult(
                            result.transfer_id,
                            tally.error is None,
                            tally.num_bytes,
                            tally.elapsed_s,
                            tally.error,
                        )
                    )

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        """Schedule, run one model step (and any KV-transfer work) on every rank, sample, update."""
        step_start = time.monotonic()
        batch = self.scheduler.schedule()
        ops, self._transfer_ops = self._transfer_ops, []
        self.last_step_was_idle = batch.is_empty and not ops and not self._transfers
        if self.last_step_was_idle:
            return []  # nothing can run now (e.g. a prefill pool full of leased blocks)
        inputs, sampling = None, []
        if timeline.enabled():
            for r in batch.requests:
                if r.first_token_s is None:  # the first of its steps counts
                    timeline.mark(r.request_id, "engine.scheduled", step_start)
        if not batch.is_empty:
            block_tables = [self.kv.block_ids(r.request_id) for r in batch.requests]
            inputs, sampling = build_step_inputs(batch, block_tables, self.kv.block_size)
        cmd = RankCommand(
            step=inputs,
            transfer_ops=ops,
            gather_transfers=self.world_size > 1 and bool(self._transfers),
        )
        logits, per_rank = self.executor.run(cmd)
        self._tally(per_rank)
        if batch.is_empty:
            return []
        computed = [r.num_computed_tokens for r in batch.requests] if timeline.enabled() else []
        tokens, logprobs = sample(logits, [batch.requests[i] for i in sampling])
        sampled: list[int | None] = [None] * len(batch.requests)
        for j, i in enumerate(sampling):
            sampled[i] = tokens[j]
        self.scheduler.update(batch, sampled)

        now = time.monotonic()
        outputs = []
        for j, i in enumerate(sampling):
            req = batch.requests[i]
            if req.first_token_s is None:
                req.first_token_s = now
                timeline.mark(req.request_id, "engine.first_token", now)
            lp = logprobs[j]
            if lp is not None:
                req.output_logprobs.append(lp)
            finish_reason = None
            if req.is_finished:
                req.finished_s = now
                finish_reason = req.status.value
                self.requests.pop(req.request_id, None)
            if self.on_request_done is not None and (
                req.is_finished or req.status is RequestStatus.PREFILLED
            ):
                self.on_request_done(req)
            outputs.append(
                EngineOutput(
                    req.request_id,
                    [tokens[j]],
                    [lp] if lp else [],
                    finish_reason,
                    req.num_cached_tokens,
                )
            )
        if timeline.enabled():  # the whole step, as the profiler times it
            timeline.step(step_start, batch.num_new_tokens, computed)
        return outputs

    def shutdown(self) -> None:
        self.executor.shutdown()
