"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))``.

An ``LLM`` is one colocated instance in this process (plus spawned ranks for TP·PP > 1: this
process is stage 0's TP rank 0, the driver). It adds the user-facing parts the engine leaves
out: tokenization, incremental detokenization, stop strings.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distserve.config import CacheConfig, EngineConfig, ParallelConfig
from distserve.engine.detokenizer import IncrementalDetokenizer
from distserve.engine.llm_engine import LLMEngine
from distserve.engine.request import Request, RequestStatus, TokenLogprobs
from distserve.engine.sampling_params import SamplingParams
from distserve.engine.scheduler import SchedulerConfig

Prompt = str | Sequence[int]


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the prompt text, when it was given as text
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens
    text: str  # generated text (stop strings applied)
    finish_reason: str  # "stop" | "length" | "abort"
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprobs] | None = None


class LLM:
    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_gib: float = 1.0,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 128,
        max_model_len: int | None = None,
        attention_backend: str = "auto",
        seed: int = 0,
        num_threads: int | None = None,
    ) -> None:
        config = EngineConfig(
            model=str(model),
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            attention_backend=attention_backend,
            seed=seed,
            num_threads=num_threads,
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=num_kv_blocks,
                cpu_memory_gib=kv_cache_memory_gib,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
            ),
            parallel=ParallelConfig(
                tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs
            ),
        )
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries for {len(prompt_list)} prompts"
                )
        # Tokenize and validate everything before admitting anything.
        encoded = [self._encode(p) for p in prompt_list]
        for ids in encoded:
            self.engine.validate_prompt(ids)

        states: dict[str, _Pending] = {}
        order = []
        for prompt, ids, params in zip(prompt_list, encoded, params_list):
            rid = f"llm-{next(self._ids)}"
            req = self.engine.add_request(rid, ids, params)
            detok = IncrementalDetokenizer(
                self.tokenizer,
                params.stop,
                params.include_stop_str_in_output,
                params.skip_special_tokens,
            )
            states[rid] = _Pending(prompt if isinstance(prompt, str) else None, req, detok)
            order.append(rid)

        progress = _progress(len(order)) if use_tqdm else None
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(order):
                outputs = self.engine.step()
                if not outputs and not self.engine.scheduler.running:
                    raise RuntimeError("the engine has waiting requests but can schedule none")
                for out in outputs:
                    state = states[out.request_id]
                    finish = out.finish_reason
                    delta = state.detok.add(out.new_token_ids, final=finish is not None)
                    if delta.stopped and finish is None:
                        self.engine.finish(out.request_id, RequestStatus.FINISHED_STOPPED)
                        finish = RequestStatus.FINISHED_STOPPED.value
                    if finish is not None:
                        done[out.request_id] = state.output(out.request_id, finish)
                        if progress is not None:
                            progress.update(1)
        except BaseException:
            for rid in order:
                if rid not in done:
                    self.engine.abort(rid)
            raise
        finally:
            if progress is not None:
                progress.close()
        return [done[rid] for rid in order]

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(prompt)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


@dataclass
class _Pending:
    prompt: str | None
    request: Request
    detok: IncrementalDetokenizer

    def output(self, request_id: str, finish_reason: str) -> RequestOutput:
        req = self.request
        return RequestOutput(
            request_id=request_id,
            prompt=self.prompt,
            prompt_token_ids=list(req.prompt_token_ids),
            token_ids=list(req.output_token_ids),
            text=self.detok.text,
            finish_reason=finish_reason,
            num_cached_tokens=req.num_cached_tokens,
            logprobs=list(req.output_logprobs)
            if req.sampling_params.logprobs is not None
            else None,
        )


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    for p in prompts:
        if not isinstance(p, str) and not (
            isinstance(p, (list, tuple))
            and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        ):
            raise ValueError(
                f"each prompt must be a string or a list of token ids, got {type(p).__name__}"
            )
    return prompts


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="req")
