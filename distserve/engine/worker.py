"""One rank's share of an instance: the model's weights and that rank's KV cache.

A worker runs whatever step it is given; it does not schedule. The driver rank owns a worker in
its own process; the other ranks of an instance run :func:`worker_loop`, receiving each step's
inputs by broadcast from the driver.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distserve.engine.kv_spec import KVCacheSpec
from distserve.engine.step_inputs import StepInputs
from distserve.model.config import ModelConfig
from distserve.model.loader import load_model
from distserve.model.parallel import TensorParallelGroup

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to build its worker (sent to spawned ranks as plain data)."""

    model_path: str
    dtype: str  # resolved: "float32" | "bfloat16" | "float16"
    device: str  # resolved: "cpu" | "cuda:N"
    num_blocks: int
    block_size: int
    attention_backend: str = "auto"
    num_threads: int | None = None


class Worker:
    def __init__(self, spec: WorkerSpec, tp: TensorParallelGroup | None = None) -> None:
        tp = tp or TensorParallelGroup()
        if spec.num_threads is not None and spec.device == "cpu":
            torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.tp = tp
        self.device = torch.device(spec.device)
        model_config = ModelConfig.from_pretrained(spec.model_path)
        self.kv_spec: KVCacheSpec = model_config.kv_spec(spec.block_size, spec.dtype)
        self.model = load_model(
            spec.model_path,
            dtype=_TORCH_DTYPES[spec.dtype],
            device=self.device,
            tp=tp,
            attention_backend=spec.attention_backend,
        )
        self.kv_cache = torch.zeros(
            (
                self.kv_spec.num_layers,
                2,
                spec.num_blocks,
                spec.block_size,
                self.kv_spec.num_local_kv_heads(tp.size),
                self.kv_spec.head_dim,
            ),
            dtype=_TORCH_DTYPES[spec.dtype],
            device=self.device,
        )

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run one step; returns float32 logits [S, vocab] for the sampling rows."""
        inputs = inputs.to(self.device) if self.device.type != "cpu" else inputs
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.attn)
        return self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))


def broadcast_step(
    inputs: StepInputs | None, src: int, group: dist.ProcessGroup | None
) -> StepInputs | None:
    """Driver → ranks: one step's inputs, or None to stop the worker loop."""
    box = [inputs]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def worker_loop(worker: Worker, src: int, group: dist.ProcessGroup | None) -> None:
    """The life of a non-driver rank: run every step the driver broadcasts, until told to stop."""
    while True:
        inputs = broadcast_step(None, src, group)
        if inputs is None:
            return
        worker.execute(inputs)
