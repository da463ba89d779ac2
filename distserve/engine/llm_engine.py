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
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distserve.config import EngineConfig
from distserve.engine.executor import (
    Executor,
    SpawnedTPExecutor,
    UniprocExecutor,
    cpu_threads_per_rank,
)
from distserve.engine.kv_manager import KVCacheManager
from distserve.engine.request import Request, RequestStatus, TokenLogprobs
from distserve.engine.sampler import sample
from distserve.engine.sampling_params import SamplingParams
from distserve.engine.scheduler import Scheduler
from distserve.engine.step_inputs import build_step_inputs
from distserve.engine.worker import WorkerSpec
from distserve.model.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class EngineOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]
    finish_reason: str | None  # "stop" | "length" | "abort" once finished


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
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        from transformers import AutoTokenizer

        self.model_config = ModelConfig.from_pretrained(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, self.model_config)
        tp_size = config.parallel.tensor_parallel_size
        cache = config.cache
        self.kv_spec = self.model_config.kv_spec(cache.block_size, self.dtype)
        num_blocks = cache.num_blocks or self._blocks_for_memory(tp_size)
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
            num_blocks * cache.block_size,
        )
        num_threads = config.num_threads
        if num_threads is None and self.device == "cpu" and tp_size > 1:
            num_threads = cpu_threads_per_rank(tp_size)
        spec = WorkerSpec(
            model_path=str(config.model),
            dtype=self.dtype,
            device=self.device,
            num_blocks=num_blocks,
            block_size=cache.block_size,
            attention_backend=config.attention_backend,
            num_threads=num_threads,
        )
        self.executor: Executor = (
            SpawnedTPExecutor(spec, tp_size) if tp_size > 1 else UniprocExecutor(spec)
        )
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(config.seed)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        logger.info(
            "engine ready: %s on %s (%s), TP=%d, %d KV blocks of %d tokens, max_model_len=%d",
            config.model,
            self.device,
            self.dtype,
            tp_size,
            num_blocks,
            cache.block_size,
            self.max_model_len,
        )

    def _blocks_for_memory(self, tp_size: int) -> int:
        block_bytes = self.kv_spec.block_bytes(tp_size)
        if self.device == "cpu":
            budget = self.config.cache.cpu_memory_gib * 2**30
        else:
            free, _total = torch.cuda.mem_get_info(torch.device(self.device))
            weights = (
                1.2 * _estimate_weight_bytes(self.model_config, self.kv_spec.dtype_bytes) / tp_size
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
        self.scheduler.add(request)
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

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler has waiting requests but could schedule none")
            return []
        block_tables = [self.kv.block_ids(r.request_id) for r in batch.requests]
        inputs, sampling = build_step_inputs(batch, block_tables, self.kv.block_size)
        logits = self.executor.execute(inputs)
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
            lp = logprobs[j]
            if lp is not None:
                req.output_logprobs.append(lp)
            finish_reason = None
            if req.is_finished:
                req.finished_s = now
                finish_reason = req.status.value
                self.requests.pop(req.request_id, None)
            outputs.append(
                EngineOutput(req.request_id, [tokens[j]], [lp] if lp else [], finish_reason)
            )
        return outputs

    def shutdown(self) -> None:
        self.executor.shutdown()
